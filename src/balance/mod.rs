//! The domain: what a `customer_sync_code` is (`code`), a wallet-balance request read and
//! validated (`request`), the cache and its freshness rules (`cache`), and the service that
//! answers from one or the other (`service`).

pub(crate) mod cache;
pub(crate) mod code;
pub(crate) mod request;
pub(crate) mod service;
