//! How to reach NATS: the servers of `NATS_URL`, the one credential, and TLS; read from the
//! environment once ([`NatsConfig::read`]) and turned into `async_nats::ConnectOptions` in one
//! place ([`NatsConfig::connect_options`]) for the functions, the source and `redrive`.
//!
//! Every credential is a file, so a mounted Kubernetes Secret can change under a running pod:
//! the files are read again at every connection and reconnection (async-nats' auth callback,
//! which it calls with the server's nonce each time it sends `CONNECT`), so a rotated token,
//! user/password, nkey seed or `.creds` file is used from the next reconnect on, without a
//! restart. TLS files are also read at each connection (async-nats builds its TLS client per
//! connection from the paths), so a renewed certificate is used from the next reconnect; an
//! established connection keeps the certificate it was made with until then.
//!
//! At start-up each file is read and checked once, so a missing, empty or malformed one is a
//! configuration error (exit 64). Whether the server accepts the credential is only known
//! when connecting, which happens in the background: a refused one leaves the client
//! retrying (logged as `authorization violation`), and a publish fails with a retryable 503
//! that says so, so the source redelivers once the secret or the server is put right.
//!
//! Secrets never reach a log line or an error: messages name the variable and the file, the
//! URL is shown with its user information replaced by `***`, and the servers handed to
//! async-nats carry no credentials at all (async-nats would ignore them, and might log them).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_nats::rustls::pki_types::pem::PemObject as _;
use async_nats::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use async_nats::{Auth, AuthError, ConnectOptions, ServerAddr};
use secrecy::{ExposeSecret as _, SecretString};

use crate::config::{ConfigError, ConfigReader};

/// The variables that hold a credential; at most one kind may be set.
pub const CREDENTIAL_VARS: [&str; 5] = [
    "NATS_CREDS_FILE",
    "NATS_NKEY_FILE",
    "NATS_TOKEN_FILE",
    "NATS_USER_FILE",
    "NATS_PASSWORD_FILE",
];

/// The variables for TLS.
pub const TLS_VARS: [&str; 3] = [
    "NATS_TLS_CA_FILE",
    "NATS_TLS_CERT_FILE",
    "NATS_TLS_KEY_FILE",
];

/// Where NATS is and how to log in: `NATS_URL` and the `NATS_*_FILE` variables.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `NATS_URL`'s servers, without their user information.
    servers: Vec<ServerAddr>,
    /// `NATS_URL` with its user information replaced by `***`, for messages.
    shown: String,
    credential: Arc<Credential>,
    tls: Tls,
}

/// One credential, as configured: where it is read from at each connection.
#[derive(Debug, Default)]
enum Credential {
    #[default]
    None,
    /// `nats://user:password@host` or `nats://token@host`: fixed, nothing to rotate.
    Url(UrlCredential),
    /// `NATS_TOKEN_FILE`.
    Token(PathBuf),
    /// `NATS_USER_FILE` + `NATS_PASSWORD_FILE`.
    UserPassword { user: PathBuf, password: PathBuf },
    /// `NATS_NKEY_FILE`: a seed, which signs the server's nonce.
    Nkey(PathBuf),
    /// `NATS_CREDS_FILE`: a user JWT and its seed (decentralized auth).
    Creds(PathBuf),
}

/// The user information of `NATS_URL` (every entry that has one must have the same).
#[derive(Debug, Clone)]
enum UrlCredential {
    UserPassword(SecretString, SecretString),
    Token(SecretString),
}

impl UrlCredential {
    fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::UserPassword(u1, p1), Self::UserPassword(u2, p2)) => {
                u1.expose_secret() == u2.expose_secret() && p1.expose_secret() == p2.expose_secret()
            }
            (Self::Token(t1), Self::Token(t2)) => t1.expose_secret() == t2.expose_secret(),
            _ => false,
        }
    }
}

/// What a credential holds at one moment: read from its files just now.
enum Loaded {
    Token(SecretString),
    UserPassword(SecretString, SecretString),
    Nkey(nkeys::KeyPair),
    /// A user JWT and the seed that signs for it.
    Jwt(SecretString, nkeys::KeyPair),
}

#[derive(Debug, Clone, Default)]
struct Tls {
    /// A `tls://` server or any TLS file: the connection must be TLS.
    required: bool,
    /// `NATS_TLS_CA_FILE`: the only trust anchors; else the system's.
    ca: Option<PathBuf>,
    /// `NATS_TLS_CERT_FILE` + `NATS_TLS_KEY_FILE`.
    client: Option<(PathBuf, PathBuf)>,
}

impl NatsConfig {
    /// Reads `NATS_URL` (unset: `None`, and no NATS) and, with it, the credential and TLS
    /// variables. Problems go to `r`: a malformed URL, more than one credential, a file that
    /// cannot be read or does not hold what its variable says, or a credential variable set
    /// without `NATS_URL`.
    pub fn read(r: &mut ConfigReader) -> Option<Self> {
        if let Some(url) = r.optional("NATS_URL") {
            return Some(Self::read_for(r, &url));
        }
        for var in CREDENTIAL_VARS.iter().chain(&TLS_VARS) {
            if r.optional(var).is_some() {
                r.problem(format!(
                    "{var} is set but NATS_URL is not (nothing would use it)"
                ));
            }
        }
        None
    }

    /// Like [`Self::read`], for the server list `url` given some other way (`redrive
    /// --nats-url`); the other variables still come from `r`.
    pub fn read_for(r: &mut ConfigReader, url: &str) -> Self {
        let shown = super::redact(url);
        let mut servers = Vec::new();
        let mut from_url: Option<UrlCredential> = None;
        match super::servers(url) {
            Err(e) => r.problem(e),
            Ok(list) => {
                for (i, server) in list.into_iter().enumerate() {
                    let (server, credential) = split_credential(server);
                    match (&from_url, credential) {
                        (Some(first), Some(this)) if !first.same_as(&this) => r.problem(format!(
                            "NATS_URL server {} ({}) has other credentials than an earlier \
                             one; give one credential for all (NATS_USER_FILE and \
                             NATS_PASSWORD_FILE, NATS_TOKEN_FILE, ...)",
                            i + 1,
                            super::redact(server.as_url_str())
                        )),
                        (None, Some(this)) => from_url = Some(this),
                        _ => {}
                    }
                    servers.push(server);
                }
            }
        }
        let credential = read_credential(r, from_url);
        let tls = read_tls(r, &servers);
        Self {
            servers,
            shown,
            credential: Arc::new(credential),
            tls,
        }
    }

    /// The configuration of `url` alone: no credential files, no TLS files (the process
    /// environment is not looked at). For tests and tools.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let env: [(&str, &str); 0] = [];
        crate::config::load(&env, |r| Self::read_for(r, url))
    }

    /// The servers, without credentials.
    pub fn servers(&self) -> &[ServerAddr] {
        &self.servers
    }

    /// `NATS_URL` with its credentials hidden, for messages.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Which kind of credential is configured: `none`, `url`, `token`, `user_password`,
    /// `nkey` or `creds` (for logs: it names the kind, never the secret).
    pub fn credential_kind(&self) -> &'static str {
        match *self.credential {
            Credential::None => "none",
            Credential::Url(_) => "url",
            Credential::Token(_) => "token",
            Credential::UserPassword { .. } => "user_password",
            Credential::Nkey(_) => "nkey",
            Credential::Creds(_) => "creds",
        }
    }

    /// Connect options with the client `name`, the credential (read again at every
    /// connection) and TLS. The caller adds what is its own (retry on the initial connect,
    /// event callbacks) and connects to [`Self::servers`].
    pub fn connect_options(&self, name: &str) -> ConnectOptions {
        let mut options = if matches!(*self.credential, Credential::None) {
            ConnectOptions::new()
        } else {
            let credential = self.credential.clone();
            ConnectOptions::with_auth_callback(move |nonce| {
                let credential = credential.clone();
                async move {
                    credential
                        .load()
                        .and_then(|loaded| loaded.auth(&nonce))
                        .map_err(AuthError::new)
                }
            })
        };
        options = options.name(name).connection_timeout(CONNECTION_TIMEOUT);
        if self.tls.required {
            options = options.require_tls(true);
        }
        if let Some(ca) = &self.tls.ca {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.tls.client {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        options
    }
}

/// How long one connection attempt (TCP, TLS, `CONNECT`) may take.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);

/// `server` without its user information, and that information as a credential: a user and
/// password, or a user alone, which NATS takes as a token (as nats.go and nats-py do).
fn split_credential(server: ServerAddr) -> (ServerAddr, Option<UrlCredential>) {
    let decode = |s: &str| -> SecretString {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
            .into()
    };
    let credential = match (server.username(), server.password()) {
        (None, _) => None,
        (Some(user), Some(password)) => {
            Some(UrlCredential::UserPassword(decode(user), decode(password)))
        }
        (Some(token), None) => Some(UrlCredential::Token(decode(token))),
    };
    if credential.is_none() {
        return (server, None);
    }
    let mut url = server.clone().into_inner();
    // Both only fail for URLs that cannot have user information, which this one had.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    match ServerAddr::from_url(url) {
        Ok(stripped) => (stripped, credential),
        Err(_) => (server, credential),
    }
}

/// The one credential of `r`'s variables (or `NATS_URL`'s), each file read and checked now.
fn read_credential(r: &mut ConfigReader, from_url: Option<UrlCredential>) -> Credential {
    let path = |r: &mut ConfigReader, var: &str| r.optional(var).map(PathBuf::from);
    let creds = path(r, "NATS_CREDS_FILE");
    let nkey = path(r, "NATS_NKEY_FILE");
    let token = path(r, "NATS_TOKEN_FILE");
    let user = path(r, "NATS_USER_FILE");
    let password = path(r, "NATS_PASSWORD_FILE");
    let mut set = Vec::new();
    if from_url.is_some() {
        set.push("credentials in NATS_URL");
    }
    if creds.is_some() {
        set.push("NATS_CREDS_FILE");
    }
    if nkey.is_some() {
        set.push("NATS_NKEY_FILE");
    }
    if token.is_some() {
        set.push("NATS_TOKEN_FILE");
    }
    if user.is_some() || password.is_some() {
        set.push("NATS_USER_FILE + NATS_PASSWORD_FILE");
    }
    if set.len() > 1 {
        r.problem(format!(
            "at most one NATS credential may be set, found {}",
            set.join(", ")
        ));
        return Credential::None;
    }
    let credential = match (from_url, creds, nkey, token, user, password) {
        (Some(url), ..) => Credential::Url(url),
        (_, Some(p), ..) => Credential::Creds(p),
        (_, _, Some(p), ..) => Credential::Nkey(p),
        (_, _, _, Some(p), ..) => Credential::Token(p),
        (_, _, _, _, Some(user), Some(password)) => Credential::UserPassword { user, password },
        (_, _, _, _, Some(_), None) => {
            r.problem("NATS_USER_FILE is set without NATS_PASSWORD_FILE");
            Credential::None
        }
        (_, _, _, _, None, Some(_)) => {
            r.problem("NATS_PASSWORD_FILE is set without NATS_USER_FILE");
            Credential::None
        }
        _ => Credential::None,
    };
    if !matches!(credential, Credential::None)
        && let Err(e) = credential.load()
    {
        r.problem(e);
    }
    credential
}

fn read_tls(r: &mut ConfigReader, servers: &[ServerAddr]) -> Tls {
    let ca = r.optional("NATS_TLS_CA_FILE").map(PathBuf::from);
    let cert = r.optional("NATS_TLS_CERT_FILE").map(PathBuf::from);
    let key = r.optional("NATS_TLS_KEY_FILE").map(PathBuf::from);
    if let Some(ca) = &ca
        && let Err(e) = certificates("NATS_TLS_CA_FILE", ca)
    {
        r.problem(e);
    }
    let client = match (cert, key) {
        (Some(cert), Some(key)) => {
            for problem in [
                certificates("NATS_TLS_CERT_FILE", &cert).err(),
                private_key("NATS_TLS_KEY_FILE", &key).err(),
            ]
            .into_iter()
            .flatten()
            {
                r.problem(problem);
            }
            Some((cert, key))
        }
        (Some(_), None) => {
            r.problem("NATS_TLS_CERT_FILE is set without NATS_TLS_KEY_FILE");
            None
        }
        (None, Some(_)) => {
            r.problem("NATS_TLS_KEY_FILE is set without NATS_TLS_CERT_FILE");
            None
        }
        (None, None) => None,
    };
    Tls {
        // As nats.go does: giving a CA or a client certificate means TLS, so a server that
        // offers none is refused instead of spoken to in the clear.
        required: ca.is_some() || client.is_some() || servers.iter().any(ServerAddr::tls_required),
        ca,
        client,
    }
}

/// Checks that `path` holds at least one PEM certificate.
fn certificates(var: &str, path: &Path) -> Result<(), String> {
    let pem = read(var, path)?;
    let certs = CertificateDer::pem_slice_iter(pem.expose_secret().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{var}={}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{var}={}: holds no PEM certificate",
            path.display()
        ));
    }
    Ok(())
}

/// Checks that `path` holds a PEM private key.
fn private_key(var: &str, path: &Path) -> Result<(), String> {
    let pem = read(var, path)?;
    PrivateKeyDer::from_pem_slice(pem.expose_secret().as_bytes())
        .map(drop)
        .map_err(|_| format!("{var}={}: holds no PEM private key", path.display()))
}

/// The text of `path`, as a secret; errors name `var` and the path, never the content.
fn read(var: &str, path: &Path) -> Result<SecretString, String> {
    std::fs::read_to_string(path)
        .map(SecretString::from)
        .map_err(|e| format!("{var}={}: cannot read it: {e}", path.display()))
}

/// A one-value file (token, user, password): its text without the line break(s) an editor or
/// `echo` leaves at the end; an empty one is an error.
fn read_value(var: &str, path: &Path) -> Result<SecretString, String> {
    let text = read(var, path)?;
    let value = text.expose_secret().trim_end_matches(['\r', '\n']);
    if value.is_empty() {
        return Err(format!("{var}={}: is empty", path.display()));
    }
    Ok(value.into())
}

/// The nkey seed in `text` (`var`'s file), as a key pair.
fn key_pair(var: &str, path: &Path, seed: &str) -> Result<nkeys::KeyPair, String> {
    // The parser's error is not shown: it might quote the seed.
    nkeys::KeyPair::from_seed(seed.trim())
        .map_err(|_| format!("{var}={}: does not hold a valid nkey seed", path.display()))
}

/// The JWT and seed of a `.creds` file: the first line inside the `-----BEGIN ... JWT-----`
/// block and the first inside the `-----BEGIN ... SEED-----` block (the layout `nsc` writes
/// and every NATS client reads).
fn creds_parts(text: &str) -> (Option<&str>, Option<&str>) {
    let (mut jwt, mut seed) = (None, None);
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if !(line.starts_with("---") && line.contains("BEGIN")) {
            continue;
        }
        let value = lines
            .by_ref()
            .find(|l| !l.is_empty())
            .filter(|l| !l.starts_with("---"));
        if line.contains("JWT") {
            jwt = jwt.or(value);
        } else if line.contains("SEED") {
            seed = seed.or(value);
        }
    }
    (jwt, seed)
}

impl Credential {
    /// Reads the credential's files now. `None` when there is no credential.
    fn load(&self) -> Result<Loaded, String> {
        Ok(match self {
            Self::None => return Err("no NATS credential is configured".to_string()),
            Self::Url(UrlCredential::Token(token)) => Loaded::Token(token.clone()),
            Self::Url(UrlCredential::UserPassword(user, password)) => {
                Loaded::UserPassword(user.clone(), password.clone())
            }
            Self::Token(path) => Loaded::Token(read_value("NATS_TOKEN_FILE", path)?),
            Self::UserPassword { user, password } => Loaded::UserPassword(
                read_value("NATS_USER_FILE", user)?,
                read_value("NATS_PASSWORD_FILE", password)?,
            ),
            Self::Nkey(path) => {
                let var = "NATS_NKEY_FILE";
                let text = read(var, path)?;
                // A seed file may hold comments or armour around the seed: take the line
                // that is one (seeds start with `S`).
                let seed = text
                    .expose_secret()
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with('S') && !l.contains(' '))
                    .ok_or_else(|| format!("{var}={}: holds no nkey seed", path.display()))?;
                Loaded::Nkey(key_pair(var, path, seed)?)
            }
            Self::Creds(path) => {
                let var = "NATS_CREDS_FILE";
                let text = read(var, path)?;
                let (jwt, seed) = creds_parts(text.expose_secret());
                let jwt = jwt
                    .ok_or_else(|| format!("{var}={}: holds no user JWT block", path.display()))?;
                let seed = seed
                    .ok_or_else(|| format!("{var}={}: holds no nkey seed block", path.display()))?;
                Loaded::Jwt(jwt.into(), key_pair(var, path, seed)?)
            }
        })
    }
}

impl Loaded {
    /// The `CONNECT` fields for the server's `nonce`.
    fn auth(&self, nonce: &[u8]) -> Result<Auth, String> {
        let mut auth = Auth::new();
        match self {
            Self::Token(token) => auth.token = Some(token.expose_secret().to_string()),
            Self::UserPassword(user, password) => {
                auth.username = Some(user.expose_secret().to_string());
                auth.password = Some(password.expose_secret().to_string());
            }
            Self::Nkey(key_pair) => {
                auth.nkey = Some(key_pair.public_key());
                auth.signature = Some(sign(key_pair, nonce)?);
            }
            Self::Jwt(jwt, key_pair) => {
                auth.jwt = Some(jwt.expose_secret().to_string());
                auth.signature = Some(sign(key_pair, nonce)?);
            }
        }
        Ok(auth)
    }
}

fn sign(key_pair: &nkeys::KeyPair, nonce: &[u8]) -> Result<Vec<u8>, String> {
    key_pair
        .sign(nonce)
        .map_err(|_| "the nkey seed cannot sign the server's nonce".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_env(env: &[(&str, &str)]) -> Result<Option<NatsConfig>, ConfigError> {
        crate::config::load(&env.to_vec(), NatsConfig::read)
    }

    fn file(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.display().to_string()
    }

    #[test]
    fn no_nats_url_is_no_nats_but_a_credential_without_it_is_a_problem() {
        assert!(read_env(&[]).expect("valid").is_none());
        let err = read_env(&[("NATS_TOKEN_FILE", "/t")]).expect_err("orphan");
        assert!(err.0[0].contains("NATS_URL is not"), "{err}");
    }

    #[test]
    fn url_credentials_are_taken_out_of_the_servers() {
        let c = NatsConfig::from_url("nats://al%40ce:p%2Fss@a:4222,nats://al%40ce:p%2Fss@b:4222")
            .expect("valid");
        assert_eq!(c.credential_kind(), "url");
        let urls: Vec<&str> = c.servers().iter().map(ServerAddr::as_url_str).collect();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4222"]);
        let Credential::Url(UrlCredential::UserPassword(user, password)) = &*c.credential else {
            panic!("user and password");
        };
        assert_eq!(user.expose_secret(), "al@ce");
        assert_eq!(password.expose_secret(), "p/ss");
        assert!(!format!("{c:?}").contains("p/ss") && !format!("{c:?}").contains("p%2Fss"));
        let token = NatsConfig::from_url("tls://s3cret@a").expect("valid");
        assert_eq!(token.credential_kind(), "url");
        assert!(token.tls.required);
        assert_eq!(token.shown_url(), "tls://***@a");
    }

    #[test]
    fn servers_with_different_url_credentials_are_a_problem_that_names_no_secret() {
        let err =
            NatsConfig::from_url("nats://u:pw-first@a,nats://u:pw-second@b").expect_err("differ");
        assert!(err.0[0].contains("server 2"), "{err}");
        assert!(!err.to_string().contains("pw-first") && !err.to_string().contains("pw-second"));
        // An entry without credentials uses those of the others.
        NatsConfig::from_url("nats://u:pw-first@a,nats://b").expect("valid");
    }

    #[test]
    fn more_than_one_credential_is_a_problem() {
        let dir = tempfile::tempdir().expect("dir");
        let token = file(&dir, "token", "t0ken\n");
        let user = file(&dir, "user", "alice");
        let err = read_env(&[
            ("NATS_URL", "nats://a"),
            ("NATS_TOKEN_FILE", &token),
            ("NATS_USER_FILE", &user),
            ("NATS_PASSWORD_FILE", &user),
        ])
        .expect_err("two kinds");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0].contains("NATS_TOKEN_FILE, NATS_USER_FILE"),
            "{err}"
        );
        let err = read_env(&[("NATS_URL", "nats://x@a"), ("NATS_TOKEN_FILE", &token)])
            .expect_err("url and file");
        assert!(err.0[0].contains("credentials in NATS_URL"), "{err}");
        let err = read_env(&[("NATS_URL", "nats://a"), ("NATS_USER_FILE", &user)])
            .expect_err("no password");
        assert!(err.0[0].contains("without NATS_PASSWORD_FILE"), "{err}");
    }

    #[test]
    fn credential_files_are_checked_at_start_up_without_showing_them() {
        let dir = tempfile::tempdir().expect("dir");
        let empty = file(&dir, "empty", "\n");
        let not_seed = file(&dir, "seed", "SUNOTASEEDATALLBUTSTARTSWITHS\n");
        let no_jwt = file(
            &dir,
            "creds",
            "-----BEGIN USER NKEY SEED-----\nSUX\n------END\n",
        );
        let missing = dir.path().join("missing").display().to_string();
        for (var, path, says) in [
            ("NATS_TOKEN_FILE", &empty, "is empty"),
            ("NATS_NKEY_FILE", &not_seed, "valid nkey seed"),
            ("NATS_CREDS_FILE", &no_jwt, "no user JWT"),
            ("NATS_TOKEN_FILE", &missing, "cannot read"),
            ("NATS_TLS_CA_FILE", &not_seed, "no PEM certificate"),
        ] {
            let err =
                read_env(&[("NATS_URL", "nats://a"), (var, path.as_str())]).expect_err("bad file");
            assert!(
                err.0[0].starts_with(var) && err.0[0].contains(says),
                "{err}"
            );
            assert!(!err.to_string().contains("SUNOTASEED"), "{err}");
        }
    }

    #[test]
    fn a_seed_signs_the_nonce_and_a_token_file_loses_its_line_break() {
        let dir = tempfile::tempdir().expect("dir");
        let user = nkeys::KeyPair::new_user();
        let seed = file(&dir, "seed", &format!("{}\n", user.seed().expect("seed")));
        let c = read_env(&[("NATS_URL", "nats://a"), ("NATS_NKEY_FILE", &seed)])
            .expect("valid")
            .expect("configured");
        let auth = c
            .credential
            .load()
            .expect("load")
            .auth(b"nonce")
            .expect("auth");
        assert_eq!(auth.nkey.as_deref(), Some(user.public_key().as_str()));
        user.verify(b"nonce", auth.signature.as_deref().expect("signed"))
            .expect("a valid signature");
        assert!(!format!("{c:?}").contains(&user.seed().expect("seed")));

        let token = file(&dir, "token", "t0ken\r\n");
        let c = read_env(&[("NATS_URL", "nats://a"), ("NATS_TOKEN_FILE", &token)])
            .expect("valid")
            .expect("configured");
        let auth = c.credential.load().expect("load").auth(b"n").expect("auth");
        assert_eq!(auth.token.as_deref(), Some("t0ken"));
    }

    #[test]
    fn a_creds_file_gives_its_jwt_and_signs_with_its_seed() {
        let user = nkeys::KeyPair::new_user();
        let text = format!(
            "-----BEGIN NATS USER JWT-----\neyJ.payload.sig\n------END NATS USER JWT------\n\n\
             ************************* IMPORTANT *************************\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        );
        let (jwt, seed) = creds_parts(&text);
        assert_eq!(jwt, Some("eyJ.payload.sig"));
        assert_eq!(seed, Some(user.seed().expect("seed").as_str()));
    }

    #[test]
    fn tls_files_require_tls_and_come_in_pairs() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../testkit/fixtures/tls");
        let f = |name: &str| fixtures.join(name).display().to_string();
        let c = read_env(&[
            ("NATS_URL", "nats://a"),
            ("NATS_TLS_CA_FILE", &f("ca.pem")),
            ("NATS_TLS_CERT_FILE", &f("client.pem")),
            ("NATS_TLS_KEY_FILE", &f("client.key")),
        ])
        .expect("valid")
        .expect("configured");
        assert!(c.tls.required && c.tls.client.is_some());
        assert!(
            !NatsConfig::from_url("nats://a")
                .expect("valid")
                .tls
                .required
        );
        let err = read_env(&[
            ("NATS_URL", "nats://a"),
            ("NATS_TLS_CERT_FILE", &f("client.pem")),
        ])
        .expect_err("no key");
        assert!(err.0[0].contains("without NATS_TLS_KEY_FILE"), "{err}");
        let err = read_env(&[
            ("NATS_URL", "nats://a"),
            ("NATS_TLS_CERT_FILE", &f("client.key")),
            ("NATS_TLS_KEY_FILE", &f("client.pem")),
        ])
        .expect_err("swapped");
        assert_eq!(err.0.len(), 2, "{err}");
    }

    #[test]
    fn the_docs_list_every_nats_credential_variable() {
        let docs = include_str!("../../../../docs/configuration.md");
        let section = docs
            .split("\n## NATS\n")
            .nth(1)
            .and_then(|rest| rest.split("\n#").next())
            .expect("a NATS section in docs/configuration.md");
        let listed: Vec<&str> = section
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split('`').next())
            .filter(|name| *name != "NATS_URL")
            .collect();
        let defined: Vec<&str> = CREDENTIAL_VARS.iter().chain(&TLS_VARS).copied().collect();
        assert_eq!(listed, defined);
    }
}
