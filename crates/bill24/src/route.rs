//! How connections reach Bill24: directly, or through an HTTP egress proxy (CONTRACT §11).
//!
//! The proxy is `upstream.proxy` when set; otherwise the environment decides as curl does
//! (`HTTPS_PROXY`/`https_proxy` for an `https://` base URL, `HTTP_PROXY`/`http_proxy` for
//! `http://`, `ALL_PROXY` for either, `NO_PROXY`/`no_proxy` to bypass), read by hyper-util's
//! proxy matcher. Through a proxy, `https://` goes in a CONNECT tunnel (TLS end to end, the
//! proxy sees only the host name) and `http://` is forwarded in absolute form, as curl does.
//! Bill24 is one host, so the route is decided once, at start.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Secret;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The connector under TLS: a TCP connection to Bill24, to a CONNECT tunnel through the proxy,
/// or to the proxy itself (plain `http://` forwarded in absolute form).
#[derive(Clone)]
pub(crate) enum Route {
    Direct(HttpConnector),
    Tunnel {
        tunnel: Tunnel<HttpConnector>,
        proxy: String,
    },
    Forward {
        http: HttpConnector,
        proxy_uri: Uri,
        proxy: String,
    },
}

/// The route chosen for `base`, and the `Proxy-Authorization` each forwarded request carries.
pub(crate) struct Chosen {
    pub route: Route,
    /// Only for [`Route::Forward`] (a tunnel sends it once, on CONNECT).
    pub forward_authorization: Option<HeaderValue>,
    /// For the start-up log line: `direct`, or the proxy's host:port and where it came from.
    pub description: String,
}

/// Decides the route to `base`. `configured` is `upstream.proxy` (already validated); without
/// it, the environment's proxy variables apply. Fails for a proxy that is not `http://`.
pub(crate) fn choose(
    base: &Uri,
    configured: Option<&Secret>,
    http: HttpConnector,
) -> Result<Chosen, String> {
    let (matcher, source) = match configured {
        Some(url) => (
            Matcher::builder()
                .http(url.expose())
                .https(url.expose())
                .build(),
            "upstream.proxy",
        ),
        None => (
            Matcher::from_env(),
            if base.scheme_str() == Some("https") {
                "HTTPS_PROXY"
            } else {
                "HTTP_PROXY"
            },
        ),
    };
    // curl's `NO_PROXY=*` bypasses the proxy for every host; hyper-util's matcher applies
    // `*` to host names only, not to IP addresses.
    let bypass_all = configured.is_none()
        && ["NO_PROXY", "no_proxy"]
            .iter()
            .find_map(|v| std::env::var(v).ok())
            .is_some_and(|list| list.split(',').any(|entry| entry.trim() == "*"));
    let intercept = if bypass_all {
        None
    } else {
        matcher.intercept(base)
    };
    let Some(intercept) = intercept else {
        if configured.is_some() {
            return Err(
                "upstream.proxy: not a usable proxy URL (http://[user:pass@]host:port)".into(),
            );
        }
        return Ok(Chosen {
            route: Route::Direct(http),
            forward_authorization: None,
            description: "direct".into(),
        });
    };
    let proxy_uri = intercept.uri().clone();
    let proxy = proxy_uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    if proxy_uri.scheme_str() != Some("http") {
        return Err(format!(
            "{source}: the proxy {}://{proxy} is not supported; only http:// proxies (HTTP \
             CONNECT) are",
            proxy_uri.scheme_str().unwrap_or("?")
        ));
    }
    let auth = intercept.basic_auth().cloned();
    let description = format!(
        "through the proxy {proxy} (from {source}{})",
        if auth.is_some() {
            ", with credentials"
        } else {
            ""
        }
    );
    Ok(if base.scheme_str() == Some("https") {
        let mut tunnel = Tunnel::new(proxy_uri, http);
        if let Some(auth) = auth {
            tunnel = tunnel.with_auth(auth);
        }
        Chosen {
            route: Route::Tunnel { tunnel, proxy },
            forward_authorization: None,
            description: format!("{description}, CONNECT tunnel"),
        }
    } else {
        Chosen {
            route: Route::Forward {
                http,
                proxy_uri,
                proxy,
            },
            forward_authorization: auth,
            description: format!("{description}, forwarded"),
        }
    })
}

/// A failure to get through the egress proxy (it refused, asked for credentials, or could not
/// be reached). Says which proxy, never its credentials.
#[derive(Debug)]
pub(crate) struct ProxyError {
    pub proxy: String,
    pub detail: String,
}

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "through the proxy {}: {}", self.proxy, self.detail)
    }
}

impl std::error::Error for ProxyError {}

impl tower_service::Service<Uri> for Route {
    type Response = Stream;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // HttpConnector and Tunnel are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Route::Direct(http) => {
                let connecting = http.call(dst);
                Box::pin(async move {
                    Ok(Stream {
                        io: connecting.await?,
                        forwarded: false,
                    })
                })
            }
            Route::Tunnel { tunnel, proxy } => through(proxy, tunnel.call(dst), false),
            Route::Forward {
                http,
                proxy_uri,
                proxy,
            } => through(proxy, http.call(proxy_uri.clone()), true),
        }
    }
}

/// A connection through `proxy`, its failures told as the proxy's.
fn through<F, E>(
    proxy: &str,
    connecting: F,
    forwarded: bool,
) -> Pin<Box<dyn Future<Output = Result<Stream, BoxError>> + Send>>
where
    F: Future<Output = Result<TokioIo<TcpStream>, E>> + Send + 'static,
    E: std::error::Error + 'static,
{
    let proxy = proxy.to_string();
    Box::pin(async move {
        let io = connecting.await.map_err(|e| ProxyError {
            proxy,
            detail: crate::chain::error_chain(&e),
        })?;
        Ok(Stream { io, forwarded })
    })
}

/// A TCP connection, marked when it goes to a forwarding proxy (hyper then writes request
/// targets in absolute form).
pub(crate) struct Stream {
    io: TokioIo<TcpStream>,
    forwarded: bool,
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forwarded)
    }
}

impl Read for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}
