//! The module layout README's "Where each part lives" describes: a loss call
//! flows one way (public losses -> what they share, `call/` -> the graph node
//! -> engines -> config), so no module names a crate module before it: the
//! linear loss never climbs back into the logits loss. Read from the sources' `crate::`
//! paths, `use` lines and inline paths alike (doc comments aside).

#[path = "common/checkout.rs"]
mod checkout;

use std::collections::BTreeSet;

/// Each source file, and the crate modules it may name.
const ALLOWED: [(&str, &[&str]); 34] = [
    ("src/config.rs", &[]),
    ("src/candle_limits.rs", &[]),
    ("src/memory.rs", &[]),
    ("src/gemm/mod.rs", &[]),
    ("src/gemm/ops.rs", &[]),
    ("src/gemm/tests.rs", &[]),
    ("src/cuda_gemm.rs", &[]),
    ("src/cpu/lanes.rs", &[]),
    ("src/cpu/scalar_f64.rs", &["config"]),
    ("src/cpu/mod.rs", &["config"]),
    ("src/primitive.rs", &["config"]),
    ("src/reference.rs", &["config"]),
    ("src/kernel_abi/shape.rs", &[]),
    ("src/kernel_abi/geometry.rs", &[]),
    ("src/kernel_abi/mod.rs", &["config"]),
    ("src/kernel_abi/tests.rs", &["config"]),
    ("src/cuda.rs", &["config", "kernel_abi"]),
    ("src/precomputed.rs", &["config", "cuda_gemm"]),
    ("src/op/fused.rs", &["config", "cpu", "cuda"]),
    ("src/op/node.rs", &["config", "precomputed"]),
    ("src/op/oracle.rs", &["config", "kernel_abi"]),
    ("src/op/mod.rs", &["config", "primitive"]),
    ("src/empty.rs", &[]),
    ("src/labels.rs", &["cuda", "kernel_abi", "op"]),
    ("src/call/mod.rs", &["config", "empty", "op"]),
    ("src/call/inputs.rs", &["candle_limits", "config", "labels", "op"]),
    ("src/call/outputs.rs", &["config"]),
    ("src/loss.rs", &["call", "candle_limits", "config", "op", "precomputed", "primitive"]),
    ("src/linear/mod.rs", &["call", "op"]),
    ("src/linear/plan.rs", &["call", "candle_limits", "config", "op", "primitive"]),
    ("src/linear/chunks.rs", &["config", "op", "precomputed"]),
    ("src/linear/direct.rs", &["call", "config", "precomputed"]),
    ("src/linear/products.rs", &["config", "cpu", "cuda_gemm", "gemm", "precomputed"]),
    ("src/linear/rows.rs", &["candle_limits", "config"]),
];

/// The crate modules `source` names as `crate::module`, outside comments.
fn named_modules(source: &str) -> BTreeSet<String> {
    let mut named = BTreeSet::new();
    for line in source.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for (i, _) in line.match_indices("crate::") {
            let rest = &line[i + "crate::".len()..];
            let module: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            // `crate::{a, b}` names each module in the braces.
            if module.is_empty() && rest.starts_with('{') {
                let inner = &rest[1..rest.find('}').unwrap_or(rest.len())];
                named.extend(inner.split(',').map(|m| m.split("::").next().unwrap_or("").trim().to_string()));
            } else {
                named.insert(module);
            }
        }
    }
    named.retain(|m| m.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
    named
}

/// Every `.rs` file under `dir`, as a path from the crate root.
fn sources(root: &str, dir: &str) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(format!("{root}/{dir}")).expect(dir).map(|e| e.expect(dir)) {
        let name = format!("{dir}/{}", entry.file_name().to_string_lossy());
        if entry.file_type().expect(dir).is_dir() {
            files.extend(sources(root, &name));
        } else if name.ends_with(".rs") {
            files.push(name);
        }
    }
    files
}

#[test]
fn modules_import_one_way() {
    let root = checkout::checkout().to_str().expect("a UTF-8 checkout path");
    // A new module takes its place in the list (`lib.rs` declares and re-exports).
    for file in sources(root, "src").into_iter().filter(|f| f != "src/lib.rs") {
        assert!(ALLOWED.iter().any(|(listed, _)| *listed == file), "{file} is not placed in ALLOWED");
    }
    for (file, allowed) in ALLOWED {
        let source = std::fs::read_to_string(format!("{root}/{file}")).expect(file);
        let named = named_modules(&source);
        let stray: Vec<&String> = named.iter().filter(|m| !allowed.contains(&m.as_str())).collect();
        assert!(stray.is_empty(), "{file} names crate modules {stray:?}; it may name only {allowed:?}");
    }
}
