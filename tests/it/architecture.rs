//! The shape of the library, checked over its source: layers point one way,
//! nothing imports in a circle, and no file is too long to read in one
//! sitting (docs/ARCHITECTURE.md states these as invariants).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::TestResult;

/// The layers, lowest first: a module may name modules of its own layer or
/// below, never above.
const LAYERS: [(&str, u8); 8] = [
    ("model", 0),
    ("error", 1),
    ("db", 2),
    ("repositories", 3),
    ("store", 4),
    ("ingest", 5),
    ("sink", 5),
    ("testing", 5),
];

/// The longest a file under `src/` may be.
const MAX_LINES: usize = 600;

/// A module by its path below the crate root (`["db", "sqlite", "files"]`).
type ModulePath = Vec<String>;

#[test]
fn layers_point_one_way_and_nothing_imports_in_a_circle() -> TestResult {
    let modules = library_modules()?;
    let known: BTreeSet<ModulePath> = modules.keys().cloned().collect();
    let mut problems = Vec::new();
    let mut edges: BTreeMap<ModulePath, BTreeSet<ModulePath>> = BTreeMap::new();
    for (module, file) in &modules {
        if module.is_empty() {
            // lib.rs re-exports every layer: it is the top.
            continue;
        }
        let text = std::fs::read_to_string(file)?;
        for target in references(module, &text, &known) {
            if target == *module {
                continue;
            }
            let (from, to) = (layer(module)?, layer(&target)?);
            if to > from {
                problems.push(format!(
                    "{} (layer {from}) imports {} (layer {to}) from above",
                    module.join("::"),
                    target.join("::")
                ));
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    problems.extend(cycles(&edges));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    Ok(())
}

#[test]
fn no_file_under_src_is_longer_than_600_lines() -> TestResult {
    let mut long = Vec::new();
    for file in library_modules()?.values() {
        let lines = std::fs::read_to_string(file)?.lines().count();
        if lines > MAX_LINES {
            long.push(format!("{}: {lines} lines", file.display()));
        }
    }
    assert!(long.is_empty(), "{}", long.join("\n"));
    Ok(())
}

/// The check itself finds what it is meant to find.
#[test]
fn the_layer_check_sees_an_upward_import_and_a_circle() -> TestResult {
    let known: BTreeSet<ModulePath> = [
        vec!["model".to_owned()],
        vec!["model".to_owned(), "key".to_owned()],
        vec!["store".to_owned()],
        vec!["repositories".to_owned(), "a".to_owned()],
        vec!["repositories".to_owned(), "b".to_owned()],
    ]
    .into_iter()
    .collect();
    let key = vec!["model".to_owned(), "key".to_owned()];
    let found = references(
        &key,
        "use crate::store::Store;\n// crate::db in a comment\n",
        &known,
    );
    assert_eq!(found, vec![vec!["store".to_owned()]]);
    let a = vec!["repositories".to_owned(), "a".to_owned()];
    let b = vec!["repositories".to_owned(), "b".to_owned()];
    let mut edges = BTreeMap::new();
    edges.insert(a.clone(), [b.clone()].into_iter().collect());
    edges.insert(b, [a].into_iter().collect());
    assert_eq!(cycles(&edges).len(), 1);
    Ok(())
}

fn layer(module: &ModulePath) -> Result<u8, String> {
    let first = module.first().map(String::as_str).unwrap_or("");
    LAYERS
        .iter()
        .find(|(name, _)| *name == first)
        .map(|(_, layer)| *layer)
        .ok_or_else(|| {
            format!(
                "module {} belongs to no layer: add it to LAYERS",
                module.join("::")
            )
        })
}

/// Every `.rs` file of the library by its module path.
fn library_modules() -> Result<BTreeMap<ModulePath, PathBuf>, Box<dyn std::error::Error>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
    let mut modules = BTreeMap::new();
    let mut folders = vec![src.clone()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let relative = path.strip_prefix(&src)?.with_extension("");
            let mut module: ModulePath = relative
                .iter()
                .map(|part| part.to_string_lossy().into_owned())
                .collect();
            if module
                .last()
                .is_some_and(|last| last == "mod" || last == "lib")
            {
                module.pop();
            }
            modules.insert(module, path);
        }
    }
    Ok(modules)
}

/// The modules that `text` (the source of `module`) names through
/// `crate::` or `super::` paths, outside comments and before its unit tests
/// (which name their own module as `super`): each resolved to the longest
/// known module its path starts with.
fn references(module: &ModulePath, text: &str, known: &BTreeSet<ModulePath>) -> Vec<ModulePath> {
    let mut found = BTreeSet::new();
    for line in text.lines() {
        if line.trim() == "#[cfg(test)]" {
            break;
        }
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        for (start, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            let preceded_by_ident = code[..start]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':');
            if preceded_by_ident {
                continue;
            }
            let (mut base, mut rest) = match code[start..].strip_prefix("crate::") {
                Some(rest) => (Vec::new(), rest),
                None => {
                    // `super` of a module is its parent; each further
                    // `super::` climbs one more.
                    let mut base = module.clone();
                    base.pop();
                    (base, &code[start + "super::".len()..])
                }
            };
            while let Some(after) = rest.strip_prefix("super::") {
                base.pop();
                rest = after;
            }
            let groups: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a::b, c}`: each part on its own.
                Some(inner) => inner.split('}').next().unwrap_or("").split(',').collect(),
                None => vec![rest],
            };
            for group in groups {
                let mut path = base.clone();
                for segment in group.trim().split("::") {
                    let name: String = segment
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if name.is_empty() || name == "self" {
                        break;
                    }
                    path.push(name);
                }
                while !path.is_empty() && !known.contains(&path) {
                    path.pop();
                }
                if !path.is_empty() {
                    found.insert(path);
                }
            }
        }
    }
    found.into_iter().collect()
}

/// Every circle in the import graph, once each, as `a -> b -> a`.
fn cycles(edges: &BTreeMap<ModulePath, BTreeSet<ModulePath>>) -> Vec<String> {
    let mut found = BTreeSet::new();
    for start in edges.keys() {
        let mut stack = vec![(start.clone(), vec![start.clone()])];
        let mut seen = BTreeSet::new();
        while let Some((node, trail)) = stack.pop() {
            for next in edges.get(&node).into_iter().flatten() {
                if next == start {
                    let mut circle: Vec<String> = trail.iter().map(|m| m.join("::")).collect();
                    // The same circle found from another of its modules
                    // reads the same once rotated to its smallest member.
                    let smallest = circle
                        .iter()
                        .enumerate()
                        .min_by(|a, b| a.1.cmp(b.1))
                        .map_or(0, |(index, _)| index);
                    circle.rotate_left(smallest);
                    let first = circle.first().cloned().unwrap_or_default();
                    circle.push(first);
                    found.insert(format!("circle: {}", circle.join(" -> ")));
                } else if seen.insert(next.clone()) {
                    let mut trail = trail.clone();
                    trail.push(next.clone());
                    stack.push((next.clone(), trail));
                }
            }
        }
    }
    found.into_iter().collect()
}
