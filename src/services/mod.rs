//! The services over the fan-out core: the one owner, per shard, of what a
//! client or a backend asks for (publish, subscribe, unsubscribe, history,
//! token expiry), composed from the shard's tables, the bus and the history.
//! Being built up in steps (see docs/design.md): today it holds the client
//! ops (`ops`), the token expiry sweep and the `refresh` op (`expiry`).

pub mod expiry;
pub mod ops;
