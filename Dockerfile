# syntax=docker/dockerfile:1
# One image per function, all built from this file:
#
#   docker build --build-arg FUNCTION=tts-module -t tts-module .
#   docker buildx build --platform linux/amd64,linux/arm64 --build-arg FUNCTION=tts-module -t tts-module .
#
# Needs BuildKit (the default builder since Docker 23) with Dockerfile syntax >= 1.20 for
# `COPY --parents`; the syntax line above fetches a current one.
# Optional labels: --build-arg VERSION=... REVISION=<git sha> SOURCE_URL=<repository URL>.

# Pinned to a minor release so two builds of the same commit use the same compiler: `rust:1`
# would move to a new stable (new lints, codegen changes) without a change in this repository.
# Bump it on purpose, together with CI's toolchain; it must stay >= the workspace rust-version.
# Bookworm only supplies musl-tools here: the binary is static, so the Debian release does not
# reach the image.
FROM rust:1.95-bookworm AS builder

RUN apt-get update \
    && apt-get install -y --no-install-recommends musl-tools \
    && rm -rf /var/lib/apt/lists/*

# The Rust target follows the platform being built (amd64 -> x86_64, arm64 -> aarch64), so
# `--platform` is all a multi-arch build needs. The compile runs natively on that platform (QEMU
# or a native builder node for the other one): cross-compiling C code (ring) to musl would need a
# cross toolchain Debian does not package. TARGET overrides the triple; leave it empty normally.
ARG TARGETARCH
ARG TARGET=""
RUN <<'EOF'
set -eu
case "${TARGET:-$TARGETARCH}" in
  amd64) TARGET=x86_64-unknown-linux-musl ;;
  arm64) TARGET=aarch64-unknown-linux-musl ;;
  *-linux-musl) ;;
  *) echo "unsupported platform '${TARGETARCH}' / TARGET '${TARGET}': use amd64, arm64 or a *-linux-musl triple" >&2; exit 1 ;;
esac
rustup target add "$TARGET"
# Every cargo command below builds for this target (fully static with musl); output goes to
# target/$TARGET/release/.
printf '[build]\ntarget = "%s"\n' "$TARGET" > "$CARGO_HOME/config.toml"
EOF

WORKDIR /build

# Dependency layers: only the manifests and the lock file, so the layers below are rebuilt when
# dependencies change, not when the code does. Plain layers rather than cache mounts: they are
# exported with `--cache-to` in CI, and parallel builds of several functions cannot race on them.
COPY Cargo.toml Cargo.lock ./
COPY --parents shared/*/Cargo.toml functions/*/Cargo.toml ./

# Cargo loads every workspace member, and each must have its targets on disk: stub a library, a
# binary, and every target given an explicit `path` (testkit's [[bin]] inference-sim). The doc
# line keeps a `missing_docs` lint quiet even at deny level.
RUN <<'EOF'
set -eu
doc='//! Stub for the dependency layer of the Dockerfile.'
for manifest in shared/*/Cargo.toml functions/*/Cargo.toml; do
  crate="${manifest%/Cargo.toml}"
  mkdir -p "$crate/src"
  printf '%s\n' "$doc" > "$crate/src/lib.rs"
  printf '%s\n' "$doc" 'fn main() {}' > "$crate/src/main.rs"
  sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' "$manifest" \
    | while read -r path; do
        mkdir -p "$crate/$(dirname "$path")"
        printf '%s\n' "$doc" 'fn main() {}' > "$crate/$path"
      done
done
EOF

# Downloads are shared by every function's build (this layer does not depend on FUNCTION).
RUN cargo fetch --locked

ARG FUNCTION
# Compile only this function's dependency graph (`-p`: features resolved for it alone), then drop
# the stubs so none of them can end up in the real build.
RUN <<'EOF'
set -eu
: "${FUNCTION:?pass --build-arg FUNCTION=<package under functions/>}"
cargo build --release --locked -p "$FUNCTION"
rm -rf shared/*/src functions/*/src
EOF

# The real sources. Add a line here if the workspace gains members outside these folders.
COPY shared/ shared/
COPY functions/ functions/
RUN <<'EOF'
set -eu
# COPY keeps the files' own mtimes, which can be older than the stub build above; touch them so
# cargo rebuilds the workspace crates instead of shipping the stubs.
find shared functions -name '*.rs' -exec touch {} +
cargo build --release --locked -p "$FUNCTION"
cp target/*/release/"$FUNCTION" /function
# scratch has no dynamic loader: refuse a binary that needs one.
if readelf --program-headers /function | grep -q INTERP; then
  echo "$FUNCTION is not statically linked" >&2
  exit 1
fi
EOF

# Nothing but the binary: no shell, no libc, no CA bundle (TLS roots are compiled into the binary
# with webpki-roots), no HEALTHCHECK (Kubernetes/Knative probe /healthz and /readyz).
FROM scratch
ARG FUNCTION
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="${FUNCTION}" \
      org.opencontainers.image.description="CloudEvents HTTP function ${FUNCTION} (static Rust binary, for Knative Serving)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE_URL}"
COPY --from=builder /function /function
# Numeric, as scratch has no /etc/passwd; matches runAsUser in the Knative manifests.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/function"]
