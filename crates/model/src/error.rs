//! Why a change could not be mapped.

use crate::record::ChangeOp;

/// Why a change could not be mapped. The record goes to the errors topic.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("map `{map}`: key field `{field}` is missing from the {which} values of the change on {entity}")]
    MissingKey {
        map: String,
        entity: String,
        field: String,
        which: &'static str,
    },
    #[error("map `{map}`: key field `{field}` is NULL on {entity}; a record without its alternate key cannot be linked")]
    NullKey {
        map: String,
        entity: String,
        field: String,
    },
    #[error("map `{map}`: mapped field `{field}` is missing from the change on {entity} (was the column dropped?)")]
    MissingField {
        map: String,
        entity: String,
        field: String,
    },
    /// The scope (filter, companies) of a side could not be evaluated;
    /// `message` names the scope and the entity.
    #[error("map `{map}`: the {side} scope cannot be evaluated on record {key}: {message}")]
    Filter {
        map: String,
        side: String,
        key: String,
        message: String,
    },
    #[error("map `{map}`: field `{field}` → `{target_field}` on {entity}: {failure}")]
    Transform {
        map: String,
        entity: String,
        /// The source column.
        field: String,
        target_field: String,
        failure: Box<crate::transform::TransformFailure>,
    },
    #[error("map `{map}`: a {op:?} on {entity} carries no {which} values")]
    MissingImage {
        map: String,
        entity: String,
        op: ChangeOp,
        which: &'static str,
    },
}
