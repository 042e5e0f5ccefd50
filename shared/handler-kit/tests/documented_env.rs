//! The environment variables the code reads are the ones the docs document, no more, no fewer.
//!
//! Configuration tables typed by hand drift from the code that defines them; this test reads
//! both sides and names every difference.
//!
//! **The code side.** Every Rust file under `functions/*/src` and `shared/*/src` (except
//! `shared/bench` and `shared/testkit`, which are tools, not functions) is tokenized, with
//! comments and `#[cfg(test)]` items removed. A *read* is
//! - a call of a [`ConfigReader`] method that takes a `key` (the list is taken from
//!   `impl ConfigReader` in `shared/handler-kit/src/config.rs`, so a new reader method is
//!   covered without touching this test),
//! - `env::var(..)` or `env::var_os(..)`,
//! - `.get(..)` on a value declared as `&dyn Env` / `&impl Env`, or named `env`.
//!
//! Its first argument decides the key:
//! - a string literal is the key;
//! - a parameter of the enclosing `fn` or closure makes that callable a *forwarder*: its call
//!   sites supply the key (`secret(r, "GITEA_WEBHOOK_SECRET")`, `path(r, "NATS_CREDS_FILE")`);
//! - `format!("{param}_SUFFIX")` (directly, or through a `let` in the same callable) makes the
//!   callable a *prefixed* forwarder: each call site's literal at that parameter's position,
//!   followed by `_SUFFIX`, is a key. This is how the backend clients' guard settings are
//!   found: `BackendConfig::read(r, "LLM", ..)` in `resilience.rs` reads
//!   `{prefix}_TIMEOUT_MS`, `{prefix}_CONCURRENCY`, ..., so it yields `LLM_TIMEOUT_MS`,
//!   `LLM_CONCURRENCY`, .... A call site that passes its own parameter on makes its callable a
//!   forwarder in turn (repeated until nothing changes);
//! - a loop variable over `const` arrays of string literals reads those literals;
//! - anything else fails the test, naming the file and line: a key this test cannot see is a
//!   key the docs cannot be checked against. Pass a literal, or teach this file the new shape.
//!
//! The plumbing inside `config.rs` itself (`ConfigReader`'s methods passing `key` on, the
//! `Env` implementations) is not a read of its own.
//!
//! **The docs side.** `functions/*/README.md` and `docs/**/*.md`. In a table whose header's
//! first cell is `variable`, every backticked `UPPER_SNAKE` name in a row's first cell is
//! documented, and a backticked `{PREFIX}_SUFFIX` documents a guard setting of every backend.
//! In a table whose header's first cell is `prefix`, every backticked `UPPER_SNAKE` name in a
//! row's first cell is a backend's prefix: with the `{PREFIX}_*` rows it documents
//! `{prefix}_{suffix}` for each. Prefixes and suffixes are also checked on their own, so a
//! `{PREFIX}_*` row or a backend's prefix row cannot go missing behind an explicit row.
//!
//! **Read by a library on our behalf.** `RUST_LOG` is read by tracing-subscriber because
//! `telemetry.rs` calls `EnvFilter::try_from_default_env`; [`READ_BY_LIBRARIES`] lists such
//! names with the call that makes the library read them, which must appear in the sources.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Variables a library reads because our code asks it to, with the call that asks.
const READ_BY_LIBRARIES: &[(&str, &str)] = &[("RUST_LOG", "EnvFilter::try_from_default_env")];

// ---------------------------------------------------------------------------------------------
// Finding the files.

fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn dirs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn files_under(dir: &Path, extension: &str, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            files_under(&path, extension, out);
        } else if path.extension().is_some_and(|e| e == extension) {
            out.push(path);
        }
    }
}

/// `functions/*/src/**/*.rs` and `shared/*/src/**/*.rs` but bench and testkit.
fn rust_sources(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let crates = dirs_in(&root.join("functions")).into_iter().chain(
        dirs_in(&root.join("shared"))
            .into_iter()
            .filter(|d| !d.ends_with("bench") && !d.ends_with("testkit")),
    );
    for krate in crates {
        files_under(&krate.join("src"), "rs", &mut out);
    }
    out.sort();
    out
}

/// `functions/*/README.md` and `docs/**/*.md`.
fn markdown_docs(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = dirs_in(&root.join("functions"))
        .into_iter()
        .map(|d| d.join("README.md"))
        .filter(|p| p.is_file())
        .collect();
    files_under(&root.join("docs"), "md", &mut out);
    out.sort();
    out
}

fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

// ---------------------------------------------------------------------------------------------
// Tokens: enough of Rust's lexical grammar to find calls and their string arguments.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Str(String),
    Punct(char),
    /// Numbers, char literals, lifetimes.
    Other,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
}

fn tokenize(src: &str) -> Vec<Token> {
    let chars: Vec<char> = src.chars().collect();
    let mut out = Vec::new();
    let (mut i, mut line) = (0, 1);
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        let start_line = line;
        if c == '\n' {
            line += 1;
            i += 1;
        } else if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    line += usize::from(chars[i] == '\n');
                    i += 1;
                }
            }
        } else if c == '"'
            || ((c == 'r' || c == 'b') && (at(i + 1) == '"' || at(i + 1) == '#'))
            || (c == 'b' && at(i + 1) == 'r' && (at(i + 2) == '"' || at(i + 2) == '#'))
        {
            // A string: "..", b"..", r".." / r#".."#, br"..".
            let mut j = i;
            while chars[j] != '"' && chars[j] != '#' {
                j += 1;
            }
            let raw = j > i && chars[j - 1] == 'r';
            let mut hashes = 0;
            while at(j) == '#' {
                hashes += 1;
                j += 1;
            }
            if at(j) != '"' {
                // `r#ident`, a raw identifier: read it as an identifier.
                i = j;
                continue;
            }
            j += 1;
            let mut text = String::new();
            loop {
                let d = at(j);
                if j >= chars.len() {
                    break;
                }
                if d == '\n' {
                    line += 1;
                }
                if !raw && d == '\\' {
                    text.push(d);
                    text.push(at(j + 1));
                    line += usize::from(at(j + 1) == '\n');
                    j += 2;
                    continue;
                }
                if d == '"' && (0..hashes).all(|k| at(j + 1 + k) == '#') {
                    j += 1 + hashes;
                    break;
                }
                text.push(d);
                j += 1;
            }
            out.push(Token {
                tok: Tok::Str(text),
                line: start_line,
            });
            i = j;
        } else if c == '\'' {
            // A char literal ('x', '\n', '{') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
                while at(i).is_alphanumeric() || at(i) == '_' {
                    i += 1;
                }
            }
            out.push(Token {
                tok: Tok::Other,
                line: start_line,
            });
        } else if c.is_ascii_digit() {
            while at(i).is_alphanumeric()
                || at(i) == '_'
                || (at(i) == '.' && at(i + 1).is_ascii_digit())
            {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Other,
                line: start_line,
            });
        } else if c.is_alphabetic() || c == '_' {
            let s = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            out.push(Token {
                tok: Tok::Ident(chars[s..i].iter().collect()),
                line: start_line,
            });
        } else {
            out.push(Token {
                tok: Tok::Punct(c),
                line: start_line,
            });
            i += 1;
        }
    }
    out
}

fn is_punct(t: Option<&Token>, c: char) -> bool {
    matches!(t, Some(Token { tok: Tok::Punct(p), .. }) if *p == c)
}

fn ident(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token {
            tok: Tok::Ident(s), ..
        }) => Some(s),
        _ => None,
    }
}

fn string(t: Option<&Token>) -> Option<&str> {
    match t {
        Some(Token {
            tok: Tok::Str(s), ..
        }) => Some(s),
        _ => None,
    }
}

/// The index of the bracket closing the one at `open` (or the end).
fn closing(toks: &[Token], open: usize) -> usize {
    let mut depth = 0i32;
    for (i, t) in toks.iter().enumerate().skip(open) {
        match t.tok {
            Tok::Punct('(' | '[' | '{') => depth += 1,
            Tok::Punct(')' | ']' | '}') => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    toks.len()
}

/// Removes every `#[cfg(test)]` item: unit tests set variables, they do not read them.
fn without_tests(toks: Vec<Token>) -> Vec<Token> {
    let marker = |i: usize| {
        is_punct(toks.get(i), '#')
            && is_punct(toks.get(i + 1), '[')
            && ident(toks.get(i + 2)) == Some("cfg")
            && is_punct(toks.get(i + 3), '(')
            && ident(toks.get(i + 4)) == Some("test")
            && is_punct(toks.get(i + 5), ')')
            && is_punct(toks.get(i + 6), ']')
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if !marker(i) {
            out.push(toks[i].clone());
            i += 1;
            continue;
        }
        // Skip to the item's end: its `;`, or its body's closing brace.
        let mut j = i + 7;
        while j < toks.len() {
            match toks[j].tok {
                Tok::Punct(';') => break,
                Tok::Punct('{') => {
                    j = closing(&toks, j);
                    break;
                }
                Tok::Punct('(' | '[') => j = closing(&toks, j) + 1,
                _ => j += 1,
            }
        }
        i = j + 1;
    }
    out
}

/// Splits `toks[range]` at commas outside brackets (angle brackets included, `->` excepted).
fn split_top_level(toks: &[Token], range: Range<usize>) -> Vec<Range<usize>> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0i32, range.start);
    let mut i = range.start;
    while i < range.end {
        match toks[i].tok {
            Tok::Punct('-') if is_punct(toks.get(i + 1), '>') => i += 1,
            Tok::Punct('(' | '[' | '{' | '<') => depth += 1,
            Tok::Punct(')' | ']' | '}' | '>') => depth -= 1,
            Tok::Punct(',') if depth == 0 => {
                parts.push(start..i);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < range.end {
        parts.push(start..range.end);
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Callables: functions and `let name = |..| ..` closures, with their parameters and bodies.

#[derive(Debug, Clone)]
struct Callable {
    name: String,
    /// The type of the `impl` block holding a function.
    owner: Option<String>,
    /// Parameter names in order (`self` included as "self").
    params: Vec<String>,
    closure: bool,
    body: Range<usize>,
}

impl Callable {
    fn has_self(&self) -> bool {
        self.params.first().is_some_and(|p| p == "self")
    }
}

fn param_name(toks: &[Token], range: Range<usize>) -> String {
    let mut names = toks[range].iter().filter_map(|t| ident(Some(t)));
    loop {
        match names.next() {
            Some("mut" | "ref") => continue,
            Some(name) => return name.to_string(),
            None => return String::new(),
        }
    }
}

fn impl_blocks(toks: &[Token]) -> Vec<(String, Range<usize>)> {
    let mut out = Vec::new();
    for i in 0..toks.len() {
        if ident(toks.get(i)) != Some("impl") {
            continue;
        }
        // An item, not `impl Trait` in a type: what comes before starts an item.
        let item = i == 0
            || matches!(toks[i - 1].tok, Tok::Punct('}' | ';' | ']' | '{'))
            || matches!(ident(toks.get(i - 1)), Some("unsafe" | "default"));
        if !item {
            continue;
        }
        let mut j = i + 1;
        if is_punct(toks.get(j), '<') {
            let mut depth = 0;
            while j < toks.len() {
                match toks[j].tok {
                    Tok::Punct('<') => depth += 1,
                    Tok::Punct('>') => {
                        depth -= 1;
                        if depth == 0 {
                            j += 1;
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        let (mut name, mut depth) = (None, 0);
        while j < toks.len() && !is_punct(toks.get(j), '{') {
            match &toks[j].tok {
                Tok::Punct('<') => depth += 1,
                Tok::Punct('>') => depth -= 1,
                Tok::Ident(s) if s == "for" && depth == 0 => name = None,
                Tok::Ident(s) if s == "where" && depth == 0 => break,
                Tok::Ident(s) if depth == 0 && name.is_none() && s != "dyn" => {
                    name = Some(s.clone());
                }
                _ => {}
            }
            j += 1;
        }
        while j < toks.len() && !is_punct(toks.get(j), '{') {
            j += 1;
        }
        if let Some(name) = name {
            out.push((name, j..closing(toks, j)));
        }
    }
    out
}

fn callables(toks: &[Token]) -> Vec<Callable> {
    let impls = impl_blocks(toks);
    let mut out = Vec::new();
    for i in 0..toks.len() {
        if ident(toks.get(i)) == Some("fn") {
            let Some(name) = ident(toks.get(i + 1)) else {
                continue;
            };
            let mut j = i + 2;
            while j < toks.len() && !is_punct(toks.get(j), '(') {
                j += 1;
            }
            let close = closing(toks, j);
            let params = split_top_level(toks, j + 1..close)
                .into_iter()
                .map(|r| param_name(toks, r))
                .collect();
            let mut k = close + 1;
            while k < toks.len() && !is_punct(toks.get(k), '{') && !is_punct(toks.get(k), ';') {
                k += 1;
            }
            if !is_punct(toks.get(k), '{') {
                continue; // a declaration without a body
            }
            let owner = impls
                .iter()
                .filter(|(_, r)| r.contains(&i))
                .min_by_key(|(_, r)| r.len())
                .map(|(n, _)| n.clone());
            out.push(Callable {
                name: name.to_string(),
                owner,
                params,
                closure: false,
                body: k..closing(toks, k),
            });
        } else if ident(toks.get(i)) == Some("let")
            && is_punct(toks.get(i + 2), '=')
            && (is_punct(toks.get(i + 3), '|') || ident(toks.get(i + 3)) == Some("move"))
        {
            let Some(name) = ident(toks.get(i + 1)) else {
                continue;
            };
            let open = if is_punct(toks.get(i + 3), '|') {
                i + 3
            } else {
                i + 4
            };
            let mut close = open + 1;
            while close < toks.len() && !is_punct(toks.get(close), '|') {
                close += 1;
            }
            let params = split_top_level(toks, open + 1..close)
                .into_iter()
                .map(|r| param_name(toks, r))
                .collect();
            // The body runs to the `;` ending the `let`.
            let mut end = close + 1;
            while end < toks.len() && !is_punct(toks.get(end), ';') {
                if matches!(toks[end].tok, Tok::Punct('(' | '[' | '{')) {
                    end = closing(toks, end);
                }
                end += 1;
            }
            out.push(Callable {
                name: name.to_string(),
                owner: None,
                params,
                closure: true,
                body: close + 1..end,
            });
        }
    }
    out
}

fn innermost(callables: &[Callable], at: usize) -> Option<usize> {
    callables
        .iter()
        .enumerate()
        .filter(|(_, c)| c.body.contains(&at))
        .min_by_key(|(_, c)| c.body.len())
        .map(|(i, _)| i)
}

// ---------------------------------------------------------------------------------------------
// Reads.

/// What a forwarder does with one of its parameters: reads it as a key, or reads it followed
/// by a suffix (`{param}_TIMEOUT_MS`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Shape {
    Key,
    Suffix(String),
}

#[derive(Debug)]
struct SourceFile {
    path: PathBuf,
    toks: Vec<Token>,
    callables: Vec<Callable>,
    /// Identifiers declared as `&dyn Env` / `&impl Env`.
    env_values: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct CodeKeys {
    /// Every key read, with where (file:line).
    keys: BTreeMap<String, BTreeSet<String>>,
    /// Prefixes given to forwarders that read `{prefix}_SUFFIX` only, with those suffixes.
    prefixed: BTreeMap<String, BTreeSet<String>>,
    /// Reads whose key could not be told.
    unresolved: Vec<String>,
}

impl CodeKeys {
    fn add(&mut self, key: String, at: String) {
        self.keys.entry(key).or_default().insert(at);
    }
}

/// `r.string(`, `env::var(`, `env.get(`: the index of the first argument, if `i` starts a read.
fn read_at(file: &SourceFile, methods: &BTreeSet<String>, i: usize) -> Option<usize> {
    let t = &file.toks;
    if is_punct(t.get(i), '.') && is_punct(t.get(i + 2), '(') {
        let method = ident(t.get(i + 1))?;
        if methods.contains(method) {
            return Some(i + 3);
        }
        if method == "get"
            && ident(t.get(i.wrapping_sub(1))).is_some_and(|v| file.env_values.contains(v))
        {
            return Some(i + 3);
        }
    }
    if ident(t.get(i)) == Some("env")
        && is_punct(t.get(i + 1), ':')
        && is_punct(t.get(i + 2), ':')
        && matches!(ident(t.get(i + 3)), Some("var" | "var_os"))
        && is_punct(t.get(i + 4), '(')
    {
        return Some(i + 5);
    }
    None
}

/// A `{name}_SUFFIX` template: the parameter and the suffix.
fn template(s: &str) -> Option<(String, String)> {
    let rest = s.strip_prefix('{')?;
    let (name, suffix) = rest.split_once('}')?;
    let ok = suffix.starts_with('_')
        && suffix
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    ok.then(|| (name.to_string(), suffix.to_string()))
}

/// `let name = format!("..")` in `body`: the format string.
fn let_format(toks: &[Token], body: &Range<usize>, name: &str) -> Option<String> {
    (body.start..body.end).find_map(|i| {
        (ident(toks.get(i)) == Some("let")
            && ident(toks.get(i + 1)) == Some(name)
            && is_punct(toks.get(i + 2), '=')
            && ident(toks.get(i + 3)) == Some("format")
            && is_punct(toks.get(i + 4), '!'))
        .then(|| string(toks.get(i + 6)).map(str::to_string))
        .flatten()
    })
}

/// `for name in A.iter().chain(&B) {` in `body`: the names of the consts iterated.
fn for_consts(toks: &[Token], body: &Range<usize>, name: &str) -> Vec<String> {
    for i in body.clone() {
        if ident(toks.get(i)) == Some("for")
            && ident(toks.get(i + 1)) == Some(name)
            && ident(toks.get(i + 2)) == Some("in")
        {
            return toks[i + 3..]
                .iter()
                .take_while(|t| t.tok != Tok::Punct('{'))
                .filter_map(|t| ident(Some(t)))
                .filter(|s| s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                .map(str::to_string)
                .collect();
        }
    }
    Vec::new()
}

/// `const NAME: [&str; N] = ["A", "B"];` anywhere: NAME -> its literals.
fn const_arrays(files: &[SourceFile]) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for file in files {
        let t = &file.toks;
        for i in 0..t.len() {
            if !matches!(ident(t.get(i)), Some("const" | "static")) {
                continue;
            }
            let Some(name) = ident(t.get(i + 1)) else {
                continue;
            };
            let Some(eq) = (i..t.len()).find(|&j| is_punct(t.get(j), '=')) else {
                continue;
            };
            if !is_punct(t.get(eq + 1), '[') && !is_punct(t.get(eq + 2), '[') {
                continue;
            }
            let open = if is_punct(t.get(eq + 1), '[') {
                eq + 1
            } else {
                eq + 2
            };
            let items = t[open + 1..closing(t, open)]
                .iter()
                .filter_map(|x| string(Some(x)).map(str::to_string))
                .collect();
            out.insert(name.to_string(), items);
        }
    }
    out
}

/// Where a forwarder is defined: file index and callable index.
type ForwarderId = (usize, usize);

fn code_keys(root: &Path, files: &[SourceFile], methods: &BTreeSet<String>) -> CodeKeys {
    let mut found = CodeKeys::default();
    let consts = const_arrays(files);
    // (forwarder, parameter index) -> what it reads from that parameter.
    let mut forwarders: BTreeMap<(ForwarderId, usize), BTreeSet<Shape>> = BTreeMap::new();

    for (fi, file) in files.iter().enumerate() {
        let plumbing = file.path.ends_with("shared/handler-kit/src/config.rs");
        for i in 0..file.toks.len() {
            let Some(arg) = read_at(file, methods, i) else {
                continue;
            };
            let at = format!("{}:{}", shown(root, &file.path), file.toks[i].line);
            let inner = innermost(&file.callables, i);
            let param = |name: &str| {
                inner.and_then(|c| file.callables[c].params.iter().position(|p| p == name))
            };
            let t = &file.toks;
            let a = if is_punct(t.get(arg), '&') {
                arg + 1
            } else {
                arg
            };
            let ends = |j: usize| is_punct(t.get(j), ',') || is_punct(t.get(j), ')');
            if is_punct(t.get(arg), ')') {
                continue; // `.parse()`, `.duration()`: another type's method
            }
            let mut format_string = None;
            if let Some(s) = string(t.get(a)).filter(|_| ends(a + 1)) {
                found.add(s.to_string(), at);
                continue;
            }
            if ident(t.get(a)) == Some("format") && is_punct(t.get(a + 1), '!') {
                format_string = string(t.get(a + 3)).map(str::to_string);
            } else if let Some(name) = ident(t.get(a)).filter(|_| ends(a + 1)) {
                if let (Some(c), Some(p)) = (inner, param(name)) {
                    if plumbing && file.callables[c].has_self() {
                        continue;
                    }
                    forwarders
                        .entry(((fi, c), p))
                        .or_default()
                        .insert(Shape::Key);
                    continue;
                }
                let body = inner.map(|c| file.callables[c].body.clone());
                if let Some(s) = body.as_ref().and_then(|b| let_format(t, b, name)) {
                    format_string = Some(s);
                } else {
                    let names = body.map(|b| for_consts(t, &b, name)).unwrap_or_default();
                    let literals: Vec<&String> = names
                        .iter()
                        .filter_map(|n| consts.get(n))
                        .flatten()
                        .collect();
                    if literals.is_empty() {
                        found.unresolved.push(format!("{at}: the key `{name}`"));
                    }
                    for literal in literals {
                        found.add(literal.clone(), at.clone());
                    }
                    continue;
                }
            }
            match format_string {
                Some(s) if !s.contains('{') => found.add(s, at),
                Some(s) => {
                    match template(&s).and_then(|(name, suffix)| Some((param(&name)?, suffix))) {
                        Some((p, suffix)) => {
                            let c = inner.expect("a parameter has a callable");
                            forwarders
                                .entry(((fi, c), p))
                                .or_default()
                                .insert(Shape::Suffix(suffix));
                        }
                        None => found
                            .unresolved
                            .push(format!("{at}: the key format!({s:?})")),
                    }
                }
                None => found
                    .unresolved
                    .push(format!("{at}: a key that is neither a literal nor a name")),
            }
        }
    }

    // Call sites of forwarders, until no new forwarder appears.
    let mut done: BTreeSet<(ForwarderId, usize, usize, usize)> = BTreeSet::new();
    loop {
        let mut grew = false;
        for (&((ff, fc), p), shapes) in forwarders.clone().iter() {
            let callable = &files[ff].callables[fc];
            let name = callable.name.as_str();
            let arg_index = if callable.has_self() { p - 1 } else { p };
            for (fi, file) in files.iter().enumerate() {
                if callable.closure && fi != ff {
                    continue;
                }
                let t = &file.toks;
                for i in 0..t.len() {
                    if ident(t.get(i)) != Some(name) || !is_punct(t.get(i + 1), '(') {
                        continue;
                    }
                    let before = |k: usize| t.get(i.wrapping_sub(k));
                    let is_call = if callable.closure {
                        // In its own file, after its `let`.
                        fi == ff && i > callable.body.end && !is_punct(before(1), '.')
                    } else if callable.has_self() {
                        is_punct(before(1), '.')
                    } else if let Some(owner) = &callable.owner {
                        is_punct(before(1), ':')
                            && is_punct(before(2), ':')
                            && (ident(before(3)) == Some(owner.as_str())
                                || (ident(before(3)) == Some("Self") && fi == ff))
                    } else {
                        !is_punct(before(1), '.') && ident(before(1)) != Some("fn")
                    };
                    if !is_call {
                        continue;
                    }
                    if !done.insert(((ff, fc), p, fi, i)) {
                        continue;
                    }
                    let at = format!("{}:{}", shown(root, &file.path), t[i].line);
                    let args = split_top_level(t, i + 2..closing(t, i + 1));
                    let Some(range) = args.get(arg_index) else {
                        found
                            .unresolved
                            .push(format!("{at}: `{name}` without its key"));
                        continue;
                    };
                    let range = range.clone();
                    if range.len() == 1
                        && let Some(literal) = string(t.get(range.start))
                    {
                        let key_too = shapes.contains(&Shape::Key);
                        for shape in shapes {
                            match shape {
                                Shape::Key => found.add(literal.to_string(), at.clone()),
                                Shape::Suffix(suffix) => {
                                    found.add(format!("{literal}{suffix}"), at.clone());
                                    if !key_too {
                                        found
                                            .prefixed
                                            .entry(literal.to_string())
                                            .or_default()
                                            .insert(suffix.clone());
                                    }
                                }
                            }
                        }
                        continue;
                    }
                    // Passed on from the caller's own parameter: the caller forwards too.
                    let passed = (range.len() == 1)
                        .then(|| ident(t.get(range.start)))
                        .flatten();
                    let caller = innermost(&file.callables, i);
                    let caller_param = passed.zip(caller).and_then(|(n, c)| {
                        file.callables[c]
                            .params
                            .iter()
                            .position(|q| q == n)
                            .map(|q| (c, q))
                    });
                    match caller_param {
                        Some((c, q)) => {
                            let entry = forwarders.entry(((fi, c), q)).or_default();
                            for shape in shapes {
                                grew |= entry.insert(shape.clone());
                            }
                        }
                        None => found
                            .unresolved
                            .push(format!("{at}: `{name}` with a key that is not a literal")),
                    }
                }
            }
        }
        if !grew {
            break;
        }
    }
    found
}

fn scan_sources(root: &Path, paths: &[PathBuf]) -> (Vec<SourceFile>, BTreeSet<String>) {
    let files: Vec<SourceFile> = paths
        .iter()
        .map(|path| {
            let text = fs::read_to_string(path).expect("a readable source");
            let toks = without_tests(tokenize(&text));
            let callables = callables(&toks);
            let mut env_values: BTreeSet<String> = ["env".to_string()].into();
            for i in 0..toks.len() {
                if is_punct(toks.get(i + 1), ':')
                    && is_punct(toks.get(i + 2), '&')
                    && matches!(ident(toks.get(i + 3)), Some("dyn" | "impl"))
                    && ident(toks.get(i + 4)) == Some("Env")
                    && let Some(name) = ident(toks.get(i))
                {
                    env_values.insert(name.to_string());
                }
            }
            SourceFile {
                path: path.clone(),
                toks,
                callables,
                env_values,
            }
        })
        .collect();
    // The reader's methods that take a key, from `impl ConfigReader` in config.rs.
    let config = root.join("shared/handler-kit/src/config.rs");
    let config = files
        .iter()
        .find(|f| f.path == config)
        .expect("shared/handler-kit/src/config.rs is scanned");
    let methods: BTreeSet<String> = config
        .callables
        .iter()
        .filter(|c| c.owner.as_deref() == Some("ConfigReader") && c.has_self())
        .filter(|c| c.params.get(1).is_some_and(|p| p == "key"))
        .map(|c| c.name.clone())
        .collect();
    (files, methods)
}

// ---------------------------------------------------------------------------------------------
// The docs.

#[derive(Debug, Default)]
struct DocNames {
    /// `UPPER_SNAKE` names of `variable` tables, with where.
    names: BTreeMap<String, BTreeSet<String>>,
    /// `{PREFIX}_SUFFIX` rows: the suffixes.
    suffixes: BTreeMap<String, BTreeSet<String>>,
    /// Names in `prefix` tables.
    prefixes: BTreeMap<String, BTreeSet<String>>,
}

fn backticked(cell: &str) -> Vec<&str> {
    cell.split('`').skip(1).step_by(2).collect()
}

fn is_env_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase())
        && s.chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

fn doc_names(root: &Path, paths: &[PathBuf]) -> DocNames {
    let mut found = DocNames::default();
    for path in paths {
        let text = fs::read_to_string(path).expect("a readable doc");
        let lines: Vec<&str> = text.lines().collect();
        let mut kind: Option<String> = None;
        for (n, line) in lines.iter().enumerate() {
            let line = line.trim();
            if !line.starts_with('|') {
                kind = None;
                continue;
            }
            let first = line
                .trim_matches('|')
                .split('|')
                .next()
                .unwrap_or("")
                .trim();
            let separator =
                |l: &str| l.trim().starts_with('|') && l.chars().all(|c| "|-: ".contains(c));
            if kind.is_none() {
                // A header, if the next line is the separator.
                if lines.get(n + 1).is_some_and(|l| separator(l)) {
                    kind = Some(first.to_ascii_lowercase());
                }
                continue;
            }
            if separator(line) {
                continue;
            }
            let at = format!("{}:{}", shown(root, path), n + 1);
            for name in backticked(first) {
                match kind.as_deref() {
                    Some("variable") if is_env_name(name) => {
                        found
                            .names
                            .entry(name.to_string())
                            .or_default()
                            .insert(at.clone());
                    }
                    Some("variable") => {
                        if let Some(suffix) = name
                            .strip_prefix("{PREFIX}")
                            .filter(|s| s.starts_with('_') && is_env_name(&s[1..]))
                        {
                            found
                                .suffixes
                                .entry(suffix.to_string())
                                .or_default()
                                .insert(at.clone());
                        }
                    }
                    Some("prefix") if is_env_name(name) => {
                        found
                            .prefixes
                            .entry(name.to_string())
                            .or_default()
                            .insert(at.clone());
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

fn listing(items: &BTreeMap<String, BTreeSet<String>>, names: &BTreeSet<String>) -> String {
    names
        .iter()
        .map(|n| {
            let wheres: Vec<&str> = items
                .get(n)
                .map(|w| w.iter().map(String::as_str).collect())
                .unwrap_or_default();
            format!("  {n}  ({})", wheres.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------
// The tests.

#[test]
fn every_variable_the_code_reads_is_documented_and_every_documented_one_is_read() {
    let root = repository();
    let (files, methods) = scan_sources(&root, &rust_sources(&root));
    assert!(
        methods.contains("optional") && methods.contains("millis"),
        "ConfigReader's methods were not found in config.rs: {methods:?}"
    );
    let code = code_keys(&root, &files, &methods);
    assert!(
        code.unresolved.is_empty(),
        "reads whose key this test cannot tell (pass a literal, or teach documented_env.rs):\n  {}",
        code.unresolved.join("\n  ")
    );
    for anchor in [
        "MAX_BODY_BYTES",
        "NATS_URL",
        "NATS_CREDS_FILE",
        "OTEL_SERVICE_NAME",
    ] {
        assert!(code.keys.contains_key(anchor), "the scan missed {anchor}");
    }
    assert!(
        !code.prefixed.is_empty(),
        "the scan found no prefixed backend settings"
    );

    let docs = doc_names(&root, &markdown_docs(&root));
    let mut read: BTreeMap<String, BTreeSet<String>> = code.keys.clone();
    for (name, evidence) in READ_BY_LIBRARIES {
        let asked = files
            .iter()
            .any(|f| fs::read_to_string(&f.path).is_ok_and(|text| text.contains(evidence)));
        assert!(
            asked,
            "{name} is listed as read by a library, but no source calls {evidence}"
        );
        read.entry((*name).to_string())
            .or_default()
            .insert(format!("read by a library: {evidence}"));
    }
    let mut documented = docs.names.clone();
    for (prefix, wheres) in &docs.prefixes {
        for suffix in docs.suffixes.keys() {
            documented
                .entry(format!("{prefix}{suffix}"))
                .or_default()
                .extend(wheres.iter().cloned());
        }
    }

    let read_names: BTreeSet<String> = read.keys().cloned().collect();
    let documented_names: BTreeSet<String> = documented.keys().cloned().collect();
    let undocumented: BTreeSet<String> = &read_names - &documented_names;
    let unread: BTreeSet<String> = &documented_names - &read_names;

    let code_suffixes: BTreeSet<String> = code.prefixed.values().flatten().cloned().collect();
    let doc_suffixes: BTreeSet<String> = docs.suffixes.keys().cloned().collect();
    let code_prefixes: BTreeSet<String> = code.prefixed.keys().cloned().collect();
    let doc_prefixes: BTreeSet<String> = docs.prefixes.keys().cloned().collect();

    let mut problems = Vec::new();
    if !undocumented.is_empty() {
        problems.push(format!(
            "read by the code but in no configuration table (functions/*/README.md, \
             docs/configuration.md):\n{}",
            listing(&read, &undocumented)
        ));
    }
    if !unread.is_empty() {
        problems.push(format!(
            "documented but read nowhere:\n{}",
            listing(&documented, &unread)
        ));
    }
    if code_suffixes != doc_suffixes {
        problems.push(format!(
            "backend guard settings: the code reads {{PREFIX}}{code_suffixes:?}, \
             the `{{PREFIX}}_*` rows document {doc_suffixes:?}"
        ));
    }
    if code_prefixes != doc_prefixes {
        problems.push(format!(
            "backend prefixes: the code uses {code_prefixes:?}, the `prefix` tables \
             document {doc_prefixes:?}"
        ));
    }
    assert!(problems.is_empty(), "\n{}", problems.join("\n\n"));
}

#[test]
fn every_function_has_a_readme_with_a_configuration_table() {
    let root = repository();
    for function in dirs_in(&root.join("functions")) {
        let readme = function.join("README.md");
        let text = fs::read_to_string(&readme)
            .unwrap_or_else(|_| panic!("{} is missing", shown(&root, &readme)));
        assert!(
            text.lines().any(|l| l.trim().starts_with("| variable |")),
            "{} has no `| variable |` table",
            shown(&root, &readme)
        );
    }
}

#[test]
fn the_scanner_sees_literals_forwarders_prefixes_and_consts_but_not_unit_tests() {
    let root = PathBuf::from("/x");
    let source = r#"
        // r.string("IN_A_COMMENT", "") is not a read.
        const NAMES: [&str; 2] = ["FROM_CONST_A", "FROM_CONST_B"];
        struct Guard;
        impl Guard {
            fn read(r: &mut ConfigReader, prefix: &str) -> u64 {
                let key = format!("{prefix}_LIMIT");
                r.parse(&key, 1) + r.parse(&format!("{prefix}_WAIT_MS"), 2)
            }
        }
        fn secret(r: &mut ConfigReader, key: &str) -> Option<String> {
            let file = format!("{key}_FILE");
            r.optional(key).or(r.optional(&file))
        }
        fn wrap(r: &mut ConfigReader, name: &str) -> u64 { Guard::read(r, name) }
        fn all(r: &mut ConfigReader, env: &dyn Env) {
            let brace = '{';
            let path = |r: &mut ConfigReader, var: &str| r.optional(var);
            path(r, "VIA_CLOSURE");
            r.millis(
                "MULTI_LINE_MS",
                5,
            );
            Guard::read(r, "LLM");
            wrap(r, "TTS");
            secret(r, "TOKEN");
            for var in NAMES.iter() { r.optional(var); }
            env.get("FROM_ENV");
            std::env::var("FROM_PROCESS");
        }
        #[cfg(test)]
        mod tests {
            fn t(r: &mut ConfigReader) { r.string("ONLY_IN_TESTS", ""); }
        }
    "#;
    let toks = without_tests(tokenize(source));
    let file = SourceFile {
        path: root.join("a.rs"),
        callables: callables(&toks),
        env_values: ["env".to_string()].into(),
        toks,
    };
    let methods: BTreeSet<String> = ["optional", "parse", "millis", "string"]
        .map(String::from)
        .into();
    let found = code_keys(&root, &[file], &methods);
    let keys: Vec<&str> = found.keys.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "FROM_CONST_A",
            "FROM_CONST_B",
            "FROM_ENV",
            "FROM_PROCESS",
            "LLM_LIMIT",
            "LLM_WAIT_MS",
            "MULTI_LINE_MS",
            "TOKEN",
            "TOKEN_FILE",
            "TTS_LIMIT",
            "TTS_WAIT_MS",
            "VIA_CLOSURE",
        ]
    );
    assert!(found.unresolved.is_empty(), "{:?}", found.unresolved);
    let prefixes: Vec<&str> = found.prefixed.keys().map(String::as_str).collect();
    assert_eq!(prefixes, ["LLM", "TTS"]);
}

#[test]
fn a_read_the_scanner_cannot_follow_is_reported() {
    let root = PathBuf::from("/x");
    let source = r#"
        fn read(r: &mut ConfigReader) { let k = pick(); r.optional(k); r.string(KEYS[0], ""); }
    "#;
    let toks = without_tests(tokenize(source));
    let file = SourceFile {
        path: root.join("b.rs"),
        callables: callables(&toks),
        env_values: BTreeSet::new(),
        toks,
    };
    let methods: BTreeSet<String> = ["optional", "string"].map(String::from).into();
    let found = code_keys(&root, &[file], &methods);
    assert_eq!(found.unresolved.len(), 2, "{:?}", found.unresolved);
}
