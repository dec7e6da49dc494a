//! docker-compose.yml and the Dockerfile, checked without Docker: the compose
//! file parses, every service can start (image or a build context with a
//! Dockerfile), every command it gives `runledger` is one the real binary
//! accepts (checked against its own `--help`), every environment variable is
//! one the CLI reads, Redis persists, and the Dockerfile builds the binary the
//! way the README says.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::{Mapping, Value};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let path = repo().join("docker-compose.yml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{} is not valid YAML: {e}", path.display()))
}

fn services(doc: &Value) -> &Mapping {
    let services = doc.get("services").and_then(Value::as_mapping).expect("docker-compose.yml has a services mapping");
    assert!(!services.is_empty(), "no services");
    services
}

fn service<'a>(doc: &'a Value, name: &str) -> &'a Value {
    services(doc).get(name).unwrap_or_else(|| panic!("no service {name}"))
}

fn name_of(key: &Value) -> String {
    key.as_str().expect("service names are strings").to_string()
}

/// A command or healthcheck test as a list of words (a string is split on whitespace).
fn words(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => s.split_whitespace().map(str::to_string).collect(),
        Value::Sequence(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("a command word must be a string, got {other:?}"),
            })
            .collect(),
        other => panic!("a command must be a string or a list, got {other:?}"),
    }
}

/// The environment of a service as (name, value) pairs, in either compose syntax.
fn environment(svc: &Value) -> Vec<(String, Option<String>)> {
    match svc.get("environment") {
        None => Vec::new(),
        Some(Value::Mapping(m)) => m
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::Null => None,
                    Value::String(s) => Some(s.clone()),
                    Value::Number(n) => Some(n.to_string()),
                    Value::Bool(b) => Some(b.to_string()),
                    other => panic!("environment value {other:?}"),
                };
                (name_of(k), value)
            })
            .collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| {
                let s = item.as_str().expect("environment entries are strings");
                match s.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (s.to_string(), None),
                }
            })
            .collect(),
        Some(other) => panic!("environment must be a mapping or a list, got {other:?}"),
    }
}

/// The build context directory and Dockerfile of a service with `build`.
fn build_of(svc: &Value) -> Option<(PathBuf, PathBuf)> {
    let build = svc.get("build")?;
    let (context, dockerfile) = match build {
        Value::String(context) => (context.clone(), "Dockerfile".to_string()),
        Value::Mapping(m) => (
            m.get("context").and_then(Value::as_str).unwrap_or(".").to_string(),
            m.get("dockerfile").and_then(Value::as_str).unwrap_or("Dockerfile").to_string(),
        ),
        other => panic!("build must be a path or a mapping, got {other:?}"),
    };
    let dir = repo().join(context);
    let file = dir.join(dockerfile);
    Some((dir, file))
}

fn runledger(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_runledger"))
        .args(args)
        .env_remove("REDIS_URL")
        .env_remove("RUNLEDGER_PREFIX")
        .output()
        .unwrap_or_else(|e| panic!("running runledger {args:?}: {e}"));
    assert!(
        out.status.success(),
        "runledger {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The subcommands `runledger --help` lists.
fn subcommands() -> BTreeSet<String> {
    let help = runledger(&["--help"]);
    let listed: BTreeSet<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    assert!(listed.contains("worker") && listed.contains("demo"), "unexpected --help: {help}");
    listed
}

/// The long flags a help text documents (`--name` followed by a space, `=`, `,` or end of line).
fn documented_flags(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']')
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| w.split(['=', '<']).next().unwrap_or(w))
        .filter(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        .map(|w| format!("--{w}"))
        .collect()
}

/// Services whose container runs the runledger image (ENTRYPOINT runledger).
fn runledger_services(doc: &Value) -> Vec<(String, &Value)> {
    services(doc).iter().filter(|(_, svc)| svc.get("build").is_some()).map(|(k, svc)| (name_of(k), svc)).collect()
}

#[test]
fn every_service_has_an_image_or_a_buildable_context() {
    let doc = compose();
    for (name, svc) in services(&doc) {
        let name = name_of(name);
        let image = svc.get("image").and_then(Value::as_str);
        let build = build_of(svc);
        assert!(image.is_some() || build.is_some(), "service {name} has neither image nor build");
        if let Some(image) = image {
            assert!(!image.trim().is_empty() && !image.contains(' '), "service {name}: bad image {image:?}");
        }
        if let Some((dir, dockerfile)) = build {
            assert!(dir.is_dir(), "service {name}: build context {} is not a directory", dir.display());
            assert!(dockerfile.is_file(), "service {name}: no Dockerfile at {}", dockerfile.display());
        }
    }
    for name in ["redis", "worker", "demo"] {
        service(&doc, name);
    }
    assert_eq!(service(&doc, "redis").get("image").and_then(Value::as_str), Some("redis:7.0"));
}

#[test]
fn commands_use_real_subcommands_and_flags() {
    let doc = compose();
    let known = subcommands();
    let services = runledger_services(&doc);
    assert!(services.len() >= 2, "worker and demo run the runledger image");
    for (name, svc) in services {
        let command = words(svc.get("command").unwrap_or_else(|| panic!("service {name} has no command")));
        let sub = command.first().unwrap_or_else(|| panic!("service {name}: empty command"));
        assert!(known.contains(sub), "service {name}: `{sub}` is not a runledger subcommand ({known:?})");
        let help = runledger(&[sub, "--help"]);
        let flags = documented_flags(&help);
        for word in &command[1..] {
            if word.starts_with("--") {
                let flag = word.split('=').next().unwrap_or(word);
                assert!(
                    flags.contains(flag),
                    "service {name}: `runledger {sub}` has no flag {flag}; its help:\n{help}"
                );
            } else {
                assert!(!word.starts_with('-'), "service {name}: short flag {word} (use long flags)");
            }
        }
    }
    // The services the brief asks for run the right subcommands.
    assert_eq!(words(service(&doc, "worker").get("command").expect("worker command"))[0], "worker");
    assert_eq!(words(service(&doc, "demo").get("command").expect("demo command"))[0], "demo");
    let worker = words(service(&doc, "worker").get("command").expect("worker command"));
    let queues: Vec<&String> = worker.windows(2).filter(|w| w[0] == "--queue").map(|w| &w[1]).collect();
    assert!(!queues.is_empty(), "the worker serves no --queue");
}

#[test]
fn environment_variables_are_ones_the_cli_reads() {
    let doc = compose();
    // The CLI documents the variables it reads for its options in --help ...
    let help = runledger(&["--help"]);
    let mut read: BTreeSet<String> = ["REDIS_URL", "RUNLEDGER_PREFIX"]
        .into_iter()
        .filter(|v| help.contains(&format!("[env: {v}=")))
        .map(str::to_string)
        .collect();
    assert_eq!(read.len(), 2, "runledger --help no longer names REDIS_URL and RUNLEDGER_PREFIX:\n{help}");
    // ... and its log filter comes from RUST_LOG.
    let main = std::fs::read_to_string(repo().join("src/bin/runledger/main.rs")).expect("read main.rs");
    assert!(main.contains("\"RUST_LOG\""), "the CLI no longer reads RUST_LOG");
    read.insert("RUST_LOG".into());

    let service_names: BTreeSet<String> = services(&doc).keys().map(name_of).collect();
    for (name, svc) in runledger_services(&doc) {
        let env = environment(svc);
        for (var, value) in &env {
            assert!(read.contains(var), "service {name} sets {var}, which runledger does not read ({read:?})");
            if var == "REDIS_URL" {
                let url = value.as_deref().unwrap_or_else(|| panic!("service {name}: REDIS_URL without a value"));
                let host = url
                    .strip_prefix("redis://")
                    .and_then(|rest| rest.split(['/', ':']).next())
                    .unwrap_or_else(|| panic!("service {name}: REDIS_URL {url} is not a redis:// URL"));
                assert!(service_names.contains(host), "service {name}: REDIS_URL host {host} is not a service");
                assert!(url.contains(":6379"), "service {name}: REDIS_URL {url} is not on port 6379");
            }
        }
        assert!(
            env.iter().any(|(var, value)| var == "REDIS_URL" && value.is_some()),
            "service {name} does not point REDIS_URL at the redis service"
        );
    }
}

#[test]
fn redis_persists_and_is_healthchecked_before_workers_start() {
    let doc = compose();
    let redis = service(&doc, "redis");
    let command = words(redis.get("command").expect("redis has a command"));
    assert!(
        command.windows(2).any(|w| w[0] == "--appendonly" && w[1] == "yes"),
        "redis does not enable appendonly: {command:?}"
    );
    for (name, value) in runledger::embedded::RECOMMENDED_CONFIG {
        assert!(
            command.windows(2).any(|w| w[0] == format!("--{name}") && w[1] == *value),
            "redis does not use the recommended {name} {value}: {command:?}"
        );
    }
    let volumes = redis.get("volumes").and_then(Value::as_sequence).expect("redis has volumes");
    let data = volumes.iter().filter_map(Value::as_str).find(|v| v.ends_with(":/data"));
    let data = data.unwrap_or_else(|| panic!("no volume for /data: {volumes:?}"));
    let volume = data.split(':').next().expect("volume name");
    let declared = doc.get("volumes").and_then(Value::as_mapping);
    assert!(
        volume.starts_with('.') || volume.starts_with('/') || declared.is_some_and(|m| m.contains_key(volume)),
        "named volume {volume} is not declared under volumes:"
    );
    let test = words(redis.get("healthcheck").and_then(|h| h.get("test")).expect("redis has a healthcheck test"));
    assert!(test.contains(&"redis-cli".to_string()) && test.contains(&"ping".to_string()), "{test:?}");

    // Everything that names another service depends on one that exists; the
    // runledger services wait for Redis to be healthy.
    let names: BTreeSet<String> = services(&doc).keys().map(name_of).collect();
    for (name, svc) in services(&doc) {
        let name = name_of(name);
        match svc.get("depends_on") {
            None => {}
            Some(Value::Sequence(list)) => {
                for dep in list {
                    assert!(names.contains(dep.as_str().expect("dependency name")), "{name} depends on {dep:?}");
                }
            }
            Some(Value::Mapping(m)) => {
                for (dep, cond) in m {
                    assert!(names.contains(&name_of(dep)), "{name} depends on unknown {dep:?}");
                    if let Some(c) = cond.get("condition").and_then(Value::as_str) {
                        assert!(
                            ["service_started", "service_healthy", "service_completed_successfully"].contains(&c),
                            "{name}: unknown condition {c}"
                        );
                    }
                }
            }
            Some(other) => panic!("{name}: depends_on {other:?}"),
        }
    }
    let worker_dep = service(&doc, "worker").get("depends_on").and_then(|d| d.get("redis"));
    assert_eq!(
        worker_dep.and_then(|d| d.get("condition")).and_then(Value::as_str),
        Some("service_healthy"),
        "the worker must wait for a healthy redis"
    );
    if let Some(replicas) = service(&doc, "worker").get("deploy").and_then(|d| d.get("replicas")) {
        assert!(replicas.as_u64().is_some_and(|n| n >= 1), "replicas {replicas:?}");
    }
}

fn port_ok(p: &str) -> bool {
    p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
}

/// Compose's short port syntax: [[IP:]HOST:]CONTAINER[/PROTOCOL], ports or ranges.
fn port_spec_ok(spec: &str) -> bool {
    let (spec, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
    if !["tcp", "udp", "sctp"].contains(&proto) {
        return false;
    }
    let parts: Vec<&str> = spec.split(':').collect();
    let ports = match parts.len() {
        1 | 2 => &parts[..],
        3 => {
            if parts[0].parse::<std::net::IpAddr>().is_err() {
                return false;
            }
            &parts[1..]
        }
        _ => return false,
    };
    ports.iter().all(|p| match p.split_once('-') {
        Some((a, b)) => port_ok(a) && port_ok(b) && a.parse::<u32>().ok() <= b.parse::<u32>().ok(),
        None => port_ok(p),
    })
}

#[test]
fn ports_are_well_formed() {
    for good in ["6379:6379", "6379", "127.0.0.1:6380:6379", "8000-8001:8000-8001", "53:53/udp"] {
        assert!(port_spec_ok(good), "{good} should be accepted");
    }
    for bad in ["6379:", "70000:6379", "redis:6379", "1:2:3:4", "6379/http", "nope:1:2"] {
        assert!(!port_spec_ok(bad), "{bad} should be refused");
    }
    let doc = compose();
    let mut seen = 0;
    for (name, svc) in services(&doc) {
        let name = name_of(name);
        let Some(ports) = svc.get("ports") else { continue };
        for port in ports.as_sequence().unwrap_or_else(|| panic!("{name}: ports must be a list")) {
            seen += 1;
            match port {
                Value::String(s) => assert!(port_spec_ok(s), "{name}: bad port {s:?}"),
                Value::Number(n) => assert!(port_ok(&n.to_string()), "{name}: bad port {n}"),
                Value::Mapping(m) => {
                    let target = m.get("target").and_then(Value::as_u64).unwrap_or(0);
                    assert!((1..=65535).contains(&target), "{name}: bad target in {m:?}");
                    if let Some(published) = m.get("published") {
                        let p = published.as_u64().map(|n| n.to_string()).or(published.as_str().map(str::to_string));
                        assert!(p.is_some_and(|p| port_spec_ok(&p)), "{name}: bad published in {m:?}");
                    }
                }
                other => panic!("{name}: bad port {other:?}"),
            }
        }
    }
    let redis_ports = words(service(&doc, "redis").get("ports").expect("redis publishes a port"));
    assert!(redis_ports.iter().any(|p| p.ends_with("6379")), "{redis_ports:?}");
    assert!(seen >= 1);
}

/// The Dockerfile's instructions, with continuation lines joined and comments dropped.
fn dockerfile_instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(body) = trimmed.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let (op, rest) = current.split_once(char::is_whitespace).unwrap_or((current.as_str(), ""));
        out.push((op.to_ascii_uppercase(), rest.split_whitespace().collect::<Vec<_>>().join(" ")));
        current.clear();
    }
    out
}

#[test]
fn dockerfile_builds_the_release_binary_as_the_readme_does() {
    let doc = compose();
    let dockerfiles: BTreeSet<PathBuf> =
        runledger_services(&doc).into_iter().filter_map(|(_, s)| build_of(s)).map(|b| b.1).collect();
    assert_eq!(dockerfiles, BTreeSet::from([repo().join("Dockerfile")]));
    let steps = dockerfile_instructions(&repo().join("Dockerfile"));

    // Stages: FROM ... [AS name].
    let stages: Vec<(usize, String, Option<String>)> = steps
        .iter()
        .enumerate()
        .filter(|(_, (op, _))| op == "FROM")
        .map(|(i, (_, rest))| {
            let w: Vec<&str> = rest.split(' ').collect();
            let alias = (w.len() == 3 && w[1].eq_ignore_ascii_case("as")).then(|| w[2].to_string());
            (i, w[0].to_string(), alias)
        })
        .collect();
    assert!(stages.len() >= 2, "the Dockerfile must be multi-stage: {stages:?}");
    let (build_at, build_image, build_alias) = stages.first().cloned().expect("a build stage");
    assert_eq!(build_image, "rust:1-bookworm");
    let build_alias = build_alias.expect("the build stage is named (FROM ... AS builder)");
    let (runtime_at, runtime_image, _) = stages.last().cloned().expect("a runtime stage");
    assert_eq!(runtime_image, "debian:bookworm-slim");

    let build_steps = &steps[build_at..runtime_at];
    assert!(
        build_steps.iter().any(|(op, rest)| op == "RUN" && rest == "cargo build --release"),
        "the build stage must run exactly `cargo build --release`: {build_steps:?}"
    );
    // What the build stage copies from the context exists (the sources and the Lua scripts it embeds).
    for (op, rest) in build_steps.iter().filter(|(op, _)| op == "COPY") {
        let args: Vec<&str> = rest.split(' ').filter(|a| !a.starts_with("--")).collect();
        for src in &args[..args.len() - 1] {
            assert!(repo().join(src).exists(), "{op} {rest}: {src} is not in the build context");
        }
    }
    let copied: Vec<&str> = build_steps.iter().filter(|(op, _)| op == "COPY").map(|(_, r)| r.as_str()).collect();
    for needed in ["Cargo.toml", "Cargo.lock", "src", "lua"] {
        assert!(copied.iter().any(|c| c.split(' ').any(|w| w == needed)), "the build stage does not copy {needed}");
    }

    let runtime_steps = &steps[runtime_at..];
    let from_builder = format!("--from={build_alias}");
    let copy = runtime_steps
        .iter()
        .find(|(op, rest)| op == "COPY" && rest.contains(&from_builder))
        .unwrap_or_else(|| panic!("the runtime stage does not COPY {from_builder}: {runtime_steps:?}"));
    let args: Vec<&str> = copy.1.split(' ').filter(|a| !a.starts_with("--")).collect();
    assert_eq!(args.len(), 2, "{copy:?}");
    assert!(args[0].ends_with("target/release/runledger"), "copies {} instead of target/release/runledger", args[0]);
    assert_eq!(args[1], "/usr/local/bin/runledger");
    let entrypoint = runtime_steps.iter().rev().find(|(op, _)| op == "ENTRYPOINT").expect("an ENTRYPOINT");
    let entry: Vec<String> = serde_json::from_str(&entrypoint.1).expect("ENTRYPOINT in exec (JSON) form");
    assert_eq!(entry, ["runledger"]);

    // The README gives the same build command.
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    assert!(readme.contains("cargo build --release"), "the README does not give `cargo build --release`");

    // The build context leaves out target/ (gigabytes) so `docker compose build` stays fast.
    let ignore = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    assert!(ignore.lines().any(|l| l.trim().trim_end_matches('/') == "target"), ".dockerignore must list target/");
}
