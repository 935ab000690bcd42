//! Where a message goes: a room, or every connection of a user. A value
//! type shared by the fan-out core, the bus and the services above them.

/// Where a message goes: a room, or every connection of a user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Room(&'a str),
    User(&'a str),
}
