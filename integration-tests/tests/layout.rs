//! The shape of the code: within each library crate, imports between
//! modules run one way. No module imports, directly or through others, a
//! module that imports it.
//!
//! A module's imports are the `crate::NAME` paths in its file(s), outside
//! comments (a doc link is not an import) and outside its `#[cfg(test)]`
//! tail (tests may reach anywhere). `lib.rs` and
//! `main.rs` are the roots that re-export and are left out; the files of a
//! folder module (`cli/`) count as that one module.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Module name → the modules of the same crate it names.
type Graph = BTreeMap<String, BTreeSet<String>>;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, with the top-level module it belongs to.
fn files(src: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(src).expect("read src") {
        let path = entry.expect("dir entry").path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("file name")
            .to_owned();
        if path.is_dir() {
            if name == "bin" {
                continue;
            }
            let mut stack = vec![path];
            while let Some(dir) = stack.pop() {
                for entry in fs::read_dir(&dir).expect("read dir") {
                    let p = entry.expect("dir entry").path();
                    if p.is_dir() {
                        stack.push(p);
                    } else if p.extension().is_some_and(|e| e == "rs") {
                        out.push((name.clone(), p));
                    }
                }
            }
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            out.push((name, path));
        }
    }
    out
}

/// The code of a file before its `#[cfg(test)]` tail, without comment
/// lines.
fn non_test(text: &str) -> String {
    let code = match text.find("\n#[cfg(test)]") {
        Some(at) => &text[..at],
        None => text,
    };
    code.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The modules named as `crate::NAME` or inside `use crate::{A, B::…}`.
fn named_modules(code: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let first = part.trim().split("::").next().unwrap_or("").trim();
                if modules.contains(first) {
                    out.insert(first.to_owned());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if modules.contains(&name) {
                out.insert(name);
            }
        }
    }
    out
}

fn graph(src: &Path) -> Graph {
    let files = files(src);
    let modules: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = Graph::new();
    for (module, path) in files {
        let text = fs::read_to_string(&path).expect("read source");
        let mut named = named_modules(&non_test(&text), &modules);
        named.remove(&module);
        graph.entry(module).or_default().extend(named);
    }
    graph
}

/// A circle of imports, if there is one, as the list of modules on it.
fn circle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = path.iter().position(|n| n == node).unwrap_or(0);
                let mut circle = path[from..].to_vec();
                circle.push(node.to_owned());
                return Some(circle);
            }
            None => {}
        }
        marks.insert(node.to_owned(), Mark::Open);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(c) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn check(krate: &str) {
    let src = workspace().join(krate).join("src");
    let graph = graph(&src);
    assert!(graph.len() > 3, "{krate}: found only {:?}", graph.keys());
    if let Some(c) = circle(&graph) {
        panic!(
            "{krate}/src has an import circle: {}; move what they share into a module below both",
            c.join(" -> ")
        );
    }
}

#[test]
fn client_modules_import_one_way() {
    check("client");
}

#[test]
fn coordinator_modules_import_one_way() {
    check("coordinator");
}

#[test]
fn proto_and_certs_modules_import_one_way() {
    check("proto");
    check("certs");
}

#[test]
fn the_check_finds_a_circle_through_a_use_group() {
    let modules: BTreeSet<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
    let a = named_modules("use crate::{b::Thing, zzz};\nfn f() {}", &modules);
    let b = named_modules("fn g() { crate::c::h() }", &modules);
    let c = named_modules(
        "use crate::a;\n#[cfg(test)]\nmod tests { use crate::b; }",
        &modules,
    );
    assert_eq!(a, BTreeSet::from(["b".to_owned()]));
    let c_code = non_test(
        "/// See [`crate::b::Thing`].\nuse crate::a;\n#[cfg(test)]\nmod tests { use crate::b; }",
    );
    assert_eq!(
        named_modules(&c_code, &modules),
        BTreeSet::from(["a".to_owned()])
    );
    assert!(c.contains("b"), "the tail is only left out by non_test");
    let mut graph = Graph::new();
    graph.insert("a".into(), a);
    graph.insert("b".into(), b);
    graph.insert("c".into(), named_modules(&c_code, &modules));
    assert_eq!(
        circle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    graph.insert("c".into(), BTreeSet::new());
    assert_eq!(circle(&graph), None);
}

/// The features of `[features]` in a Cargo.toml, as name → its list.
fn features(manifest: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in manifest.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            inside = line == "[features]";
            continue;
        }
        if inside {
            if let Some((name, list)) = line.split_once('=') {
                out.insert(name.trim().to_owned(), list.trim().to_owned());
            }
        }
    }
    out
}

/// The `qmesh` command gets its log format from qmesh-proto; only `qmesh
/// demo`, which runs a coordinator in its own process, needs the
/// coordinator library, and it is a feature of its own.
#[test]
fn the_qmesh_command_needs_the_coordinator_only_for_demo() {
    let path = workspace().join("client").join("Cargo.toml");
    let manifest = fs::read_to_string(path).expect("read client/Cargo.toml");
    let features = features(&manifest);
    let cli = features.get("cli").expect("a cli feature");
    let demo = features.get("demo").expect("a demo feature");
    assert!(!cli.contains("qmesh-coordinator"), "cli = {cli}");
    assert!(cli.contains("qmesh-proto/logging"), "cli = {cli}");
    assert!(demo.contains("dep:qmesh-coordinator"), "demo = {demo}");
    let dependency = manifest
        .lines()
        .find(|l| l.starts_with("qmesh-coordinator ="))
        .expect("the coordinator dependency");
    assert!(dependency.contains("optional = true"), "{dependency}");
    let src = workspace().join("client").join("src");
    let mut sources: Vec<PathBuf> = files(&src).into_iter().map(|(_, f)| f).collect();
    sources.push(src.join("main.rs"));
    sources.push(src.join("lib.rs"));
    for file in sources {
        let text = fs::read_to_string(&file).expect("read source");
        // Doc examples and unit tests may use it: it is a dev-dependency.
        if non_test(&text).contains("qmesh_coordinator") {
            assert!(
                file.ends_with("cli/demo.rs"),
                "{} uses the coordinator library",
                file.display()
            );
        }
    }
}
