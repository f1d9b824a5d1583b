//! Which side, and which way: the two words every other module speaks.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which of the two sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SideId {
    Left,
    Right,
}

impl SideId {
    pub fn other(self) -> SideId {
        match self {
            SideId::Left => SideId::Right,
            SideId::Right => SideId::Left,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            SideId::Left => "left",
            SideId::Right => "right",
        }
    }
}

impl fmt::Display for SideId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Direction in which a field (or a map) syncs.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    #[default]
    Both,
    LeftToRight,
    RightToLeft,
}

impl Direction {
    /// Whether a change coming from `source` flows through a field of this direction.
    pub fn carries_from(self, source: SideId) -> bool {
        matches!(
            (self, source),
            (Direction::Both, _)
                | (Direction::LeftToRight, SideId::Left)
                | (Direction::RightToLeft, SideId::Right)
        )
    }
}
