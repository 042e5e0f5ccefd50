//! Decentralized NATS auth for tests: an operator, a system account and an application account
//! with JetStream, made fresh per test with the `nkeys` crate and signed here, served by a
//! `nats-server` with the memory resolver; users get `.creds` files as `nsc` writes them.
//!
//! The JWTs are the v2 claims nats-server reads (`typ: JWT`, `alg: ed25519-nkey`, the
//! `nats` claim naming the type), signed by the key one level up: the operator signs the
//! accounts, the account signs its users.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::{Value, json};

/// An operator with a system account and one application account (`APP`, JetStream on).
pub struct Decentralized {
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
}

impl std::fmt::Debug for Decentralized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Decentralized")
            .field("operator", &self.operator.public_key())
            .field("account", &self.account.public_key())
            .finish()
    }
}

impl Default for Decentralized {
    fn default() -> Self {
        Self::new()
    }
}

impl Decentralized {
    /// New keys for the operator and both accounts.
    pub fn new() -> Self {
        Self {
            operator: KeyPair::new_operator(),
            system: KeyPair::new_account(),
            account: KeyPair::new_account(),
        }
    }

    /// The server config lines ([`crate::nats_server::NatsOptions::config`]): the operator,
    /// the system account, and both account JWTs preloaded into the memory resolver.
    pub fn server_config(&self) -> String {
        let operator = sign(
            &self.operator,
            &self.operator.public_key(),
            "testkit-operator",
            json!({
                "type": "operator",
                "version": 2,
                "system_account": self.system.public_key(),
            }),
        );
        let system = self.account_jwt(&self.system, "SYS", false);
        let account = self.account_jwt(&self.account, "APP", true);
        format!(
            "operator: {operator}\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {system}\n  {}: {account}\n}}\n",
            self.system.public_key(),
            self.system.public_key(),
            self.account.public_key(),
        )
    }

    /// A `.creds` file for a new user of `APP`, named `name`.
    pub fn user_creds(&self, name: &str) -> String {
        let user = KeyPair::new_user();
        let jwt = sign(
            &self.account,
            &user.public_key(),
            name,
            json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                "type": "user", "version": 2,
            }),
        );
        creds(&jwt, &user.seed().expect("a user seed"))
    }

    fn account_jwt(&self, key: &KeyPair, name: &str, jetstream: bool) -> String {
        let mut limits = json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
        });
        if jetstream {
            for field in ["mem_storage", "disk_storage", "streams", "consumer"] {
                limits[field] = json!(-1);
            }
        }
        sign(
            &self.operator,
            &key.public_key(),
            name,
            json!({"limits": limits, "type": "account", "version": 2}),
        )
    }
}

/// A `.creds` file's text: the JWT and the seed in their armoured blocks.
pub fn creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// A JWT for `subject`, issued and signed by `issuer`.
fn sign(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"typ": "JWT", "alg": "ed25519-nkey"}).to_string());
    let now = chrono::Utc::now().timestamp();
    let claims = json!({
        "jti": format!("{subject}{now}"),
        "iat": now,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signed = format!("{header}.{body}");
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}
