//! What a field mapping does with values: the transforms applied one way
//! or the other, the checks of its settings, and how values compare.

use super::{Direction, FieldMapping, MapConfig, SideId};
use crate::transform::*;

impl FieldMapping {
    /// The value this field writes on `source.other()` for the source value
    /// `value`, or why it cannot.
    pub fn map_value(
        &self,
        source: SideId,
        value: Option<&str>,
    ) -> Result<Option<String>, TransformFailure> {
        self.transform.apply(source.other(), value)
    }

    /// Problems with this field's names, direction and transforms in
    /// `map`, as (what, message); `what` is the TOML key at fault.
    pub fn problems(&self, map: &MapConfig) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match (self.left.is_empty(), self.right.is_empty(), &self.transform.constant) {
            (true, true, _) => out.push((
                "left",
                "a field needs a column: give `left` and `right`".to_owned(),
            )),
            (true, false, None) | (false, true, None) => {
                let missing = if self.left.is_empty() { "left" } else { "right" };
                out.push((
                    missing,
                    format!("`{missing}` is required (only a field with a `constant` names one side)"),
                ))
            }
            (false, false, Some(_)) => out.push((
                "constant",
                "a constant field names its target column only, e.g. { right = \"msdyn_source\", constant = \"fno\" }: remove the other side's column, whose value would be ignored".to_owned(),
            )),
            (l_empty, _, Some(_)) => {
                let (target, want) = if l_empty {
                    (SideId::Right, Direction::LeftToRight)
                } else {
                    (SideId::Left, Direction::RightToLeft)
                };
                if self.direction != want {
                    out.push((
                        "direction",
                        format!(
                            "a constant on the {target} column flows towards it only: remove `direction` or set it to \"{}\"",
                            if want == Direction::LeftToRight { "left_to_right" } else { "right_to_left" }
                        ),
                    ));
                }
            }
            (false, false, None) => {}
        }
        let is_key = map.left.key.contains(&self.left) || map.right.key.contains(&self.right);
        if is_key && !self.transform.is_identity() {
            out.push((
                "left",
                format!(
                    "key field `{}` ↔ `{}` cannot have a transform: alternate keys must be equal on both sides",
                    self.left, self.right
                ),
            ));
        }
        out.extend(self.transform.problems(self.direction));
        out
    }

    /// Whether the field's column exists on `side` (a constant names the
    /// target column only).
    pub fn has_column(&self, side: SideId) -> bool {
        !self.name(side).is_empty()
    }

    /// Whether a record's `left` and `right` values of this field agree:
    /// the value the field's direction carries (left → right for a field
    /// that syncs both ways), once transformed, is the other side's value.
    /// A value that does not transform does not agree.
    pub fn values_agree(&self, left: Option<&str>, right: Option<&str>) -> bool {
        let (source, from, to) = if self.direction == Direction::RightToLeft {
            (SideId::Right, right, left)
        } else {
            (SideId::Left, left, right)
        };
        match self.map_value(source, from) {
            Ok(v) => self.same_on(source.other(), v.as_deref(), to),
            Err(_) => false,
        }
    }

    /// Whether `written` (what the field writes on `target`) and `current`
    /// (what the target holds) are the same value: equal text, or equal
    /// once both are in the canonical form of the target's declared type.
    pub fn same_on(&self, target: SideId, written: Option<&str>, current: Option<&str>) -> bool {
        if written == current {
            return true;
        }
        let ty = self.transform.convert.as_ref().and_then(|c| c.get(target));
        match (ty, written, current) {
            (Some(ty), Some(a), Some(b)) => match (convert(a, ty, ty), convert(b, ty, ty)) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            },
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transform::tests::value_map;

    #[test]
    fn same_on_compares_canonical_forms() {
        let fm = FieldMapping {
            left: "a".into(),
            right: "b".into(),
            direction: Direction::Both,
            transform: Transform {
                convert: Some(Convert {
                    left: "integer".into(),
                    right: "numeric".into(),
                }),
                ..Transform::default()
            },
        };
        assert!(fm.same_on(SideId::Right, Some("1"), Some("1.00")));
        assert!(!fm.same_on(SideId::Right, Some("1"), Some("1.01")));
        assert!(!fm.same_on(SideId::Right, Some("1"), None));
        assert!(fm.same_on(SideId::Right, None, None));
    }

    #[test]
    fn values_agree_after_the_transform() {
        let mut fm = FieldMapping {
            left: "status".into(),
            right: "statecode".into(),
            direction: Direction::Both,
            transform: value_map(),
        };
        assert!(fm.values_agree(Some("Active"), Some("0")));
        assert!(!fm.values_agree(Some("Active"), Some("1")));
        assert!(!fm.values_agree(Some("Pending"), Some("Pending")));
        assert!(fm.values_agree(None, None));
        fm.direction = Direction::RightToLeft;
        assert!(fm.values_agree(Some("Closed"), Some("1")));
        let constant = FieldMapping {
            left: String::new(),
            right: "msdyn_source".into(),
            direction: Direction::LeftToRight,
            transform: Transform {
                constant: Some("fno".into()),
                ..Transform::default()
            },
        };
        assert!(constant.values_agree(None, Some("fno")));
        assert!(!constant.values_agree(None, Some("crm")));
    }
}
