//! Reading the OpenAPI documents: shared by the unit checks in `src/openapi_docs.rs` (error
//! types against the documents) and `tests/openapi.rs` (real responses against them).

#![allow(dead_code)]

use std::collections::BTreeSet;

use serde_json::Value;

pub fn load(text: &str) -> Value {
    serde_norway::from_str(text).expect("the document is YAML")
}

pub fn endpoint_doc() -> Value {
    load(include_str!("../../openapi.yaml"))
}

pub fn admin_doc() -> Value {
    load(include_str!("../../openapi-admin.yaml"))
}

/// Follows a local `$ref`.
pub fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => {
            let mut node = doc;
            for part in reference.trim_start_matches("#/").split('/') {
                node = &node[part];
            }
            resolve(doc, node)
        }
        None => value,
    }
}

/// The documented response for a status: its own entry, or the `4XX`/`5XX` range.
pub fn documented<'a>(doc: &'a Value, operation: &'a Value, status: u16) -> Option<&'a Value> {
    let responses = &operation["responses"];
    responses
        .get(status.to_string())
        .or_else(|| responses.get(format!("{}XX", status / 100)))
        .map(|r| resolve(doc, r))
}

/// The codes the `Error` schema lists.
pub fn error_codes(doc: &Value) -> BTreeSet<String> {
    doc["components"]["schemas"]["Error"]["properties"]["code"]["enum"]
        .as_array()
        .expect("an enum of codes")
        .iter()
        .filter_map(|c| c.as_str().map(str::to_string))
        .collect()
}
