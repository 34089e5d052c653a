//! Taking the mesh out of a pod template: exactly what `isthmus inject` put in (its
//! two init containers, its three volumes, the meshed label, its annotations, and
//! the maps and lists it had to create for them), so that uninjecting an injected
//! workload gives back the workload as it was, as objects.
//!
//! What cannot be undone exactly is refused, never guessed: mesh containers without
//! the annotation inject writes (added by hand or by another tool), or a record of
//! created fields that does not parse.

use serde_yaml_ng::{Mapping, Value};

use super::{
    CREATED_ANNOTATION, DISCOVERY_VOLUME, IDENTITY_VOLUME, INIT_CONTAINER, INIT_RUN_VOLUME,
    INJECTED_ANNOTATION, MESHED_LABEL, PROXY_CONTAINER,
};

/// The maps and lists inject may have to create, innermost last.
const SLOTS: [&str; 6] = [
    "metadata",
    "metadata.labels",
    "metadata.annotations",
    "spec",
    "spec.initContainers",
    "spec.volumes",
];

/// Whether `template` carries the mesh: inject's annotation, or its sidecar.
pub(super) fn is_injected(template: &Value) -> bool {
    injected_annotation(template).is_some() || has_mesh_container(template)
}

fn injected_annotation(template: &Value) -> Option<&Value> {
    template
        .get("metadata")?
        .get("annotations")?
        .get(INJECTED_ANNOTATION)
}

fn has_mesh_container(template: &Value) -> bool {
    ["initContainers", "containers"].iter().any(|list| {
        template
            .get("spec")
            .and_then(|s| s.get(*list))
            .and_then(Value::as_sequence)
            .is_some_and(|cs| cs.iter().any(is_mesh_container))
    })
}

fn is_mesh_container(container: &Value) -> bool {
    matches!(
        container.get("name").and_then(Value::as_str),
        Some(INIT_CONTAINER | PROXY_CONTAINER)
    )
}

/// The record of what an injection of `template` (not injected) creates: the
/// [`SLOTS`] that are absent, or null (`metadata.labels:null`), space-separated.
pub(super) fn created_slots(template: &Value) -> String {
    SLOTS
        .iter()
        .filter_map(|slot| match at(template, slot) {
            None => Some((*slot).to_owned()),
            Some(Value::Null) => Some(format!("{slot}:null")),
            Some(_) => None,
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn at<'a>(template: &'a Value, slot: &str) -> Option<&'a Value> {
    slot.split('.').try_fold(template, |v, key| v.get(key))
}

/// Takes the mesh out of `template`, or says why it cannot be done exactly (and
/// then `template` is to be discarded: it may be half done).
pub(super) fn remove(template: &mut Value) -> Result<(), String> {
    if injected_annotation(template).is_none() {
        return Err(format!(
            "it has an {INIT_CONTAINER} or {PROXY_CONTAINER} container but no \
             {INJECTED_ANNOTATION} annotation, so isthmus inject did not add them (or they \
             were edited since); remove them by hand"
        ));
    }
    let created = match template
        .get("metadata")
        .and_then(|m| m.get("annotations"))
        .and_then(|a| a.get(CREATED_ANNOTATION))
    {
        None => Vec::new(),
        Some(Value::String(record)) => parse_record(record)?,
        Some(other) => {
            return Err(format!(
                "annotation {CREATED_ANNOTATION} is {other:?}, not the list inject writes"
            ));
        }
    };
    if let Some(metadata) = template.get_mut("metadata").and_then(Value::as_mapping_mut) {
        take(metadata, "labels", |labels| {
            labels
                .as_mapping_mut()
                .map(|l| l.shift_remove(MESHED_LABEL));
        });
        take(metadata, "annotations", |annotations| {
            if let Some(a) = annotations.as_mapping_mut() {
                a.shift_remove(INJECTED_ANNOTATION);
                a.shift_remove(CREATED_ANNOTATION);
            }
        });
    }
    if let Some(spec) = template.get_mut("spec").and_then(Value::as_mapping_mut) {
        for list in ["initContainers", "containers"] {
            take(spec, list, |containers| {
                if let Some(cs) = containers.as_sequence_mut() {
                    cs.retain(|c| !is_mesh_container(c));
                }
            });
        }
        take(spec, "volumes", |volumes| {
            if let Some(vs) = volumes.as_sequence_mut() {
                vs.retain(|v| {
                    !matches!(
                        v.get("name").and_then(Value::as_str),
                        Some(INIT_RUN_VOLUME | IDENTITY_VOLUME | DISCOVERY_VOLUME)
                    )
                });
            }
        });
    }
    // Innermost first: `metadata` goes only once its labels and annotations went.
    for (slot, was_null) in created.iter().rev() {
        restore(template, slot, *was_null);
    }
    Ok(())
}

fn take(parent: &mut Mapping, key: &str, edit: impl FnOnce(&mut Value)) {
    if let Some(value) = parent.get_mut(key) {
        edit(value);
    }
}

/// `(slot, whether it was null)` for each entry of the record.
fn parse_record(record: &str) -> Result<Vec<(&'static str, bool)>, String> {
    record
        .split_whitespace()
        .map(|entry| {
            let (slot, was_null) = match entry.strip_suffix(":null") {
                Some(slot) => (slot, true),
                None => (entry, false),
            };
            match SLOTS.iter().find(|s| **s == slot) {
                Some(known) => Ok((*known, was_null)),
                None => Err(format!(
                    "annotation {CREATED_ANNOTATION} names {entry:?}, which inject never creates"
                )),
            }
        })
        .collect()
}

/// Puts a slot inject created back as it was (absent, or null), when nothing but
/// the mesh went into it: what was added to it since (an annotation, a volume) is
/// the user's, and stays.
fn restore(template: &mut Value, slot: &str, was_null: bool) {
    let (parent_path, key) = slot.rsplit_once('.').unwrap_or(("", slot));
    let parent = if parent_path.is_empty() {
        Some(&mut *template)
    } else {
        template.get_mut(parent_path)
    };
    let Some(parent) = parent.and_then(Value::as_mapping_mut) else {
        return;
    };
    let empty = match parent.get(key) {
        Some(Value::Mapping(m)) => m.is_empty(),
        Some(Value::Sequence(s)) => s.is_empty(),
        _ => false,
    };
    if !empty {
        return;
    }
    if was_null {
        parent.insert(Value::from(key), Value::Null);
    } else {
        parent.shift_remove(key);
    }
}
