//! Who the client is to the API server: the configuration kube-rs reads, what of it is refused
//! at start, and the credentials every request carries (a bearer token, also from a file that
//! is read again as it rotates; basic auth; a client certificate; impersonation headers).

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use handler_kit::HandlerError;
use handler_kit::http::Identity;

/// How often a token file is read again: service account tokens are rotated by the kubelet.
const TOKEN_FILE_REFRESH: Duration = Duration::from_secs(60);

/// The configuration from `kubeconfig` when given, else inferred (`$KUBECONFIG` or
/// `~/.kube/config`, else the in-cluster service account). Reads local files only.
pub(super) async fn load(kubeconfig: Option<&Path>) -> Result<kube::Config, String> {
    match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| format!("KUBECONFIG {}: {e}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &Default::default())
                .await
                .map_err(|e| format!("KUBECONFIG {}: {e}", path.display()))
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration: {e}")),
    }
}

/// Refuses, at start, what the client does not do, rather than failing every request later:
/// exec and auth-provider credential plugins, `insecure-skip-tls-verify` and proxies.
pub(super) fn refuse_unsupported(config: &kube::Config) -> Result<(), String> {
    let refuse = |what: &str| Err(format!("Kubernetes configuration: {what} is not supported"));
    let user = &config.auth_info;
    if user.exec.is_some() || user.auth_provider.is_some() {
        return refuse(
            "an exec or auth-provider credential plugin (use a token, a token file or a client certificate)",
        );
    }
    if config.accept_invalid_certs {
        return refuse("insecure-skip-tls-verify (give the cluster's CA)");
    }
    if config.proxy_url.is_some() {
        return refuse("proxy-url");
    }
    Ok(())
}

/// How requests prove who sends them.
#[derive(Debug)]
pub(super) enum Auth {
    None,
    /// A fixed `Authorization` value (a token or basic credentials).
    Fixed(HeaderValue),
    /// A bearer token file read again every [`TOKEN_FILE_REFRESH`].
    TokenFile {
        path: PathBuf,
        current: RwLock<(HeaderValue, Instant)>,
    },
}

impl Auth {
    /// The `Authorization` a kubeconfig user (or the service account) gives: its token, its
    /// token file (read now, so a missing one fails at start), or its basic credentials.
    pub(super) fn of(user: &kube::config::AuthInfo) -> Result<Self, String> {
        use secrecy::ExposeSecret as _;
        if let Some(token) = &user.token {
            return Ok(Self::Fixed(bearer(token.expose_secret())?));
        }
        if let Some(path) = &user.token_file {
            let path = PathBuf::from(path);
            let value =
                read_token(&path).map_err(|e| format!("token file {}: {e}", path.display()))?;
            return Ok(Self::TokenFile {
                path,
                current: RwLock::new((value, Instant::now())),
            });
        }
        if let (Some(name), Some(password)) = (&user.username, &user.password) {
            let credentials = base64::engine::general_purpose::STANDARD
                .encode(format!("{name}:{}", password.expose_secret()));
            let mut value = HeaderValue::from_str(&format!("Basic {credentials}"))
                .map_err(|_| "the username or password is not a valid header value".to_string())?;
            value.set_sensitive(true);
            return Ok(Self::Fixed(value));
        }
        Ok(Self::None)
    }

    /// The `Authorization` header of the next request, if any.
    pub(super) fn header(&self) -> Result<Option<HeaderValue>, HandlerError> {
        match self {
            Self::None => Ok(None),
            Self::Fixed(value) => Ok(Some(value.clone())),
            Self::TokenFile { path, current } => {
                if let Ok(read) = current.read()
                    && read.1.elapsed() < TOKEN_FILE_REFRESH
                {
                    return Ok(Some(read.0.clone()));
                }
                // A token file that cannot be read now keeps the last token: it may still be
                // valid, and the API server says so (401) if it is not.
                let value = match read_token(path) {
                    Ok(value) => value,
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "token file unreadable; keeping the last token");
                        return Ok(current.read().ok().map(|c| c.0.clone()));
                    }
                };
                if let Ok(mut write) = current.write() {
                    *write = (value.clone(), Instant::now());
                }
                Ok(Some(value))
            }
        }
    }
}

fn bearer(token: &str) -> Result<HeaderValue, String> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
        .map_err(|_| "the token is not a valid header value".to_string())?;
    value.set_sensitive(true);
    Ok(value)
}

fn read_token(path: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    bearer(&text)
}

/// The client certificate and key (PEM), from the kubeconfig's data or files.
pub(super) fn identity(user: &kube::config::AuthInfo) -> Result<Option<Identity>, String> {
    use secrecy::ExposeSecret as _;
    let decode = |what: &str, data: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| format!("{what}: {e}"))
    };
    let read =
        |what: &str, path: &str| std::fs::read(path).map_err(|e| format!("{what} {path}: {e}"));
    let cert = match (&user.client_certificate_data, &user.client_certificate) {
        (Some(data), _) => Some(decode("client-certificate-data", data)?),
        (None, Some(path)) => Some(read("client-certificate", path)?),
        (None, None) => None,
    };
    let key = match (&user.client_key_data, &user.client_key) {
        (Some(data), _) => Some(decode("client-key-data", data.expose_secret())?),
        (None, Some(path)) => Some(read("client-key", path)?),
        (None, None) => None,
    };
    match (cert, key) {
        (Some(certificates), Some(key)) => Ok(Some(Identity { certificates, key })),
        (None, None) => Ok(None),
        _ => Err("a client certificate needs its key, and a key its certificate".into()),
    }
}

/// `Impersonate-*` headers for a kubeconfig user that impersonates.
pub(super) fn impersonation(user: &kube::config::AuthInfo) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    let value = |v: &str| HeaderValue::from_str(v).map_err(|_| format!("impersonation: {v:?}"));
    if let Some(name) = &user.impersonate {
        headers.insert(HeaderName::from_static("impersonate-user"), value(name)?);
    }
    if let Some(uid) = &user.impersonate_uid {
        headers.insert(HeaderName::from_static("impersonate-uid"), value(uid)?);
    }
    for group in user.impersonate_groups.iter().flatten() {
        headers.append(HeaderName::from_static("impersonate-group"), value(group)?);
    }
    Ok(headers)
}
