//! The domain: what a `customer_sync_code` is (`code`), a wallet-balance request read and
//! validated (`request`), the cache and its freshness rules (`cache`), and the service that
//! answers from one or the other (`service`).

pub mod cache;
pub mod code;
pub mod request;
pub mod service;
