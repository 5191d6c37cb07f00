//! Plain values: ids, times, secrets, keys, budgets, events, prices and usage, with the rules
//! their fields follow. Nothing here touches a database, and nothing here
//! imports from another layer of keytally: [`crate::Error`] and everything
//! else build on these.

pub(crate) mod budget;
pub(crate) mod event;
pub(crate) mod invalid;
pub(crate) mod key;
pub(crate) mod location;
pub(crate) mod price;
pub(crate) mod secret;
pub(crate) mod time;
pub(crate) mod usage;
