//! A small YAML tree built from saphyr-parser's events, with each node's line, and the
//! lookups `manifest` needs (`entries`, `required`, `only`...), each naming the field
//! and line it complains about.
//!
//! Why not a serde deserializer: we want the line of every key, and we decide how
//! aliases expand. Anchored nodes are shared (`Rc`), never copied, and the size of the
//! tree as it would be expanded is counted while it is built, so a "billion laughs"
//! document stops at `MAX_NODES` after a few thousand events instead of exhausting memory.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use saphyr_parser::{Event, Parser, ScalarStyle};

use super::error::{Error, Result};

/// Largest manifest file read (BackingImage documents are a few hundred bytes each).
pub const MAX_INPUT_BYTES: usize = 1 << 20;
/// Most nodes a file may expand to, aliases counted at their expanded size.
pub const MAX_NODES: usize = 20_000;
/// Deepest nesting of mappings and sequences.
pub const MAX_DEPTH: usize = 32;

#[derive(Debug)]
pub(crate) enum Value {
    /// Text and whether it was written plain (unquoted): only plain `null`, `~` or
    /// nothing at all is null.
    Scalar(String, bool),
    Seq(Vec<Rc<Node>>),
    /// Keys and values alternate.
    Map(Vec<Rc<Node>>),
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) value: Value,
    pub(crate) line: usize,
    /// Nodes in this subtree as expanded (aliases at their full size).
    size: usize,
}

impl Node {
    pub(crate) fn is_null(&self) -> bool {
        matches!(&self.value, Value::Scalar(s, true) if matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL"))
    }
}

struct Frame {
    items: Vec<Rc<Node>>,
    is_map: bool,
    anchor: usize,
    line: usize,
    size: usize,
}

pub(crate) fn load(text: &str) -> Result<Vec<Rc<Node>>> {
    let syntax = |e: saphyr_parser::ScanError| {
        Error::BadInput(format!(
            "line {}: not valid YAML: {}",
            e.marker().line(),
            e.info()
        ))
    };
    let mut docs = Vec::new();
    let mut stack: Vec<Frame> = Vec::new();
    let mut anchors: HashMap<usize, Rc<Node>> = HashMap::new();
    let mut expanded = 0usize;
    let mut root: Option<Rc<Node>> = None;
    for event in Parser::new_from_str(text) {
        let (event, span) = event.map_err(syntax)?;
        let line = span.start.line();
        let node = match event {
            Event::StreamStart | Event::StreamEnd | Event::Nothing | Event::DocumentStart(_) => {
                continue
            }
            Event::DocumentEnd => {
                // A document of comments only is an empty (null) one: nothing to apply.
                docs.extend(root.take().filter(|n| !n.is_null()));
                continue;
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if stack.len() >= MAX_DEPTH {
                    return Err(Error::BadInput(format!(
                        "line {line}: the YAML nests deeper than {MAX_DEPTH} levels; a manifest needs a handful"
                    )));
                }
                let is_map = matches!(event, Event::MappingStart(..));
                stack.push(Frame {
                    items: Vec::new(),
                    is_map,
                    anchor,
                    line,
                    size: 1,
                });
                expanded += 1;
                check_budget(expanded, line)?;
                continue;
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let f = stack.pop().expect("the parser balances starts and ends");
                let node = Rc::new(Node {
                    value: if f.is_map {
                        Value::Map(f.items)
                    } else {
                        Value::Seq(f.items)
                    },
                    line: f.line,
                    size: f.size,
                });
                if f.anchor != 0 {
                    anchors.insert(f.anchor, node.clone());
                }
                node
            }
            Event::Scalar(text, style, anchor, _tag) => {
                expanded += 1;
                check_budget(expanded, line)?;
                let node = Rc::new(Node {
                    value: Value::Scalar(text.into_owned(), style == ScalarStyle::Plain),
                    line,
                    size: 1,
                });
                if anchor != 0 {
                    anchors.insert(anchor, node.clone());
                }
                node
            }
            Event::Alias(id) => {
                let node = anchors.get(&id).cloned().ok_or_else(|| {
                    Error::BadInput(format!("line {line}: an alias names no anchor"))
                })?;
                // Shared, not copied; but counted at its full size.
                expanded = expanded.saturating_add(node.size);
                check_budget(expanded, line)?;
                node
            }
        };
        match stack.last_mut() {
            Some(parent) => {
                parent.size = parent.size.saturating_add(node.size);
                parent.items.push(node);
            }
            None => root = Some(node),
        }
    }
    docs.extend(root.take().filter(|n| !n.is_null()));
    Ok(docs)
}

fn check_budget(expanded: usize, line: usize) -> Result<()> {
    if expanded > MAX_NODES {
        return Err(Error::BadInput(format!(
            "line {line}: the YAML expands to more than {MAX_NODES} nodes (aliases counted in full); \
             a BackingImage manifest needs a few dozen: refusing it"
        )));
    }
    Ok(())
}

pub(crate) fn bad(line: usize, field: &str, msg: impl std::fmt::Display) -> Error {
    let field = if field.is_empty() {
        "the document"
    } else {
        field
    };
    Error::BadInput(format!("line {line}: {field}: {msg}"))
}

/// A mapping's entries by key, each with its key's line; duplicate keys are errors.
pub(crate) fn entries<'a>(
    node: &'a Node,
    field: &str,
) -> Result<BTreeMap<String, (usize, &'a Node)>> {
    entries_merged(node, field, 0)
}

/// As `entries`, with YAML merge keys (`<<: *base`, as Kubernetes' YAML reader takes them):
/// a key given in the mapping wins over a merged one. `depth` bounds chains of merges,
/// which nest without nesting in the text.
fn entries_merged<'a>(
    node: &'a Node,
    field: &str,
    depth: usize,
) -> Result<BTreeMap<String, (usize, &'a Node)>> {
    let Value::Map(items) = &node.value else {
        return Err(bad(
            node.line,
            field,
            "expected a mapping (key: value lines)",
        ));
    };
    if depth > MAX_DEPTH {
        return Err(bad(
            node.line,
            field,
            format!("merge keys (<<) chained deeper than {MAX_DEPTH}"),
        ));
    }
    let mut out = BTreeMap::new();
    let mut merged: Vec<&Node> = Vec::new();
    for pair in items.chunks(2) {
        let (k, v) = (&pair[0], &pair[1]);
        let Value::Scalar(key, plain) = &k.value else {
            return Err(bad(k.line, field, "keys must be plain text"));
        };
        if key == "<<" && *plain {
            match &v.value {
                Value::Map(_) => merged.push(v),
                Value::Seq(list) => merged.extend(list.iter().map(|n| &**n)),
                Value::Scalar(..) => {
                    return Err(bad(
                        k.line,
                        &join(field, "<<"),
                        "merges a mapping or a list of mappings (<<: *anchor)",
                    ))
                }
            }
            continue;
        }
        if let Some((first, _)) = out.insert(key.clone(), (k.line, &**v)) {
            let hint = if field.is_empty() {
                "; separate documents with a line holding `---`"
            } else {
                ""
            };
            return Err(bad(
                k.line,
                &join(field, key),
                format!("given twice (first on line {first}){hint}"),
            ));
        }
    }
    for m in merged {
        for (k, entry) in entries_merged(m, field, depth + 1)? {
            out.entry(k).or_insert(entry);
        }
    }
    Ok(out)
}

pub(crate) fn join(field: &str, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else {
        format!("{field}.{key}")
    }
}

/// Rejects keys not in `known`, naming the first with its line.
pub(crate) fn only(
    map: &BTreeMap<String, (usize, &Node)>,
    field: &str,
    known: &[&str],
    what: &str,
) -> Result<()> {
    let mut unknown: Vec<(usize, &String)> = map
        .iter()
        .filter(|(k, _)| !known.contains(&k.as_str()))
        .map(|(k, (line, _))| (*line, k))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some((line, key)) => Err(bad(
            *line,
            &join(field, key),
            format!("unknown field; {what} has {}", known.join(", ")),
        )),
    }
}

/// A scalar as text; null as None.
pub(crate) fn text(node: &Node, field: &str) -> Result<Option<String>> {
    if node.is_null() {
        return Ok(None);
    }
    match &node.value {
        Value::Scalar(s, _) => Ok(Some(s.clone())),
        _ => Err(bad(
            node.line,
            field,
            "expected a single value, not a list or mapping",
        )),
    }
}

pub(crate) fn required(
    map: &BTreeMap<String, (usize, &Node)>,
    field: &str,
    key: &str,
    at: usize,
) -> Result<(usize, String)> {
    match map.get(key) {
        Some((line, v)) => match text(v, &join(field, key))? {
            Some(s) if !s.is_empty() => Ok((*line, s)),
            _ => Err(bad(*line, &join(field, key), "is empty")),
        },
        None => Err(bad(at, &join(field, key), "is missing")),
    }
}

pub(crate) fn tags(node: &Node, field: &str) -> Result<Vec<String>> {
    if node.is_null() {
        return Ok(Vec::new());
    }
    let Value::Seq(items) = &node.value else {
        return Err(bad(
            node.line,
            field,
            "expected a list of tags, such as [ssd, fast]",
        ));
    };
    let mut out = Vec::new();
    for item in items {
        out.extend(text(item, field)?);
    }
    out.sort();
    out.dedup();
    Ok(out)
}
