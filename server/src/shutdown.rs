//! Graceful shutdown: failbackd stops taking work, finishes the replies it is sending, and
//! only then goes.
//!
//! A rewind that loses its source mid-reply retries on a new connection within its
//! `--timeout`, so a restart of failbackd (an upgrade, a new certificate) costs a rewind a wait,
//! not a failure. Shutting down well makes that wait short and clean: once shutdown begins
//! ([`Drain::begin`]), both transports stop accepting connections, and a new request on a
//! connection still open is refused at once with `UNAVAILABLE` ([`SHUTTING_DOWN`]), which the
//! client retries, instead of being started and cut. The replies already in flight (a
//! `ReadRanges` stream of many MB) are finished, for at most the shutdown timeout; those left
//! then are cut, and the client fetches them again.
//!
//! gRPC: tonic's graceful shutdown closes the listening socket and sends each connection an
//! HTTP/2 GOAWAY, then waits for the connections' streams to end, without a bound; [`Draining`]
//! counts the replies and refuses requests that still arrive (sent before the GOAWAY reached
//! the client). QUIC has no GOAWAY: [`crate::quic`] refuses new connections and streams itself
//! and closes the endpoint once the replies are done.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http_body::{Frame, SizeHint};
use tokio::sync::watch;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::{Bytes, Service};
use tonic::server::NamedService;

/// What a request refused during shutdown is told: retryable, and why.
pub const SHUTTING_DOWN: &str =
    "failbackd is shutting down: try again once it is back (failback retries within --timeout)";

/// How long replies in flight may take to finish once shutdown begins, by default.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether shutdown began, and the replies being sent, on both transports.
#[derive(Debug)]
pub struct Drain {
    stopping: watch::Sender<bool>,
    in_flight: watch::Sender<usize>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            stopping: watch::Sender::new(false),
            in_flight: watch::Sender::new(0),
        }
    }
}

impl Drain {
    /// Begins shutdown (again: nothing more); the replies in flight at that moment.
    pub fn begin(&self) -> usize {
        self.stopping.send_replace(true);
        self.in_flight()
    }

    pub fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// Returns once shutdown has begun.
    pub async fn stopping(&self) {
        let mut rx = self.stopping.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Replies being sent now.
    pub fn in_flight(&self) -> usize {
        *self.in_flight.borrow()
    }

    /// Counts a reply until the guard is dropped.
    pub fn reply(self: &Arc<Self>) -> ReplyGuard {
        self.in_flight.send_modify(|n| *n += 1);
        ReplyGuard(self.clone())
    }

    /// Returns once no reply is in flight.
    pub async fn finished(&self) {
        let mut rx = self.in_flight.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Waits for the replies in flight for at most `limit`; the replies left (0: all finished).
    pub async fn finish_within(&self, limit: Duration) -> usize {
        let _ = tokio::time::timeout(limit, self.finished()).await;
        self.in_flight()
    }
}

/// One reply in flight ([`Drain::reply`]).
#[derive(Debug)]
pub struct ReplyGuard(Arc<Drain>);

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        self.0.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The gRPC service, counting its replies in `drain` and refusing requests once shutdown
/// began.
#[derive(Clone)]
pub struct Draining<S> {
    inner: S,
    drain: Arc<Drain>,
}

impl<S> Draining<S> {
    pub fn new(inner: S, drain: Arc<Drain>) -> Self {
        Draining { inner, drain }
    }
}

impl<S: NamedService> NamedService for Draining<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Draining<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>, Error = Infallible>,
    S::Future: Send + 'static,
    R: http_body::Body<Data = Bytes> + Send + 'static,
    R::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.drain.is_stopping() {
            return Box::pin(std::future::ready(Ok(
                Status::unavailable(SHUTTING_DOWN).into_http()
            )));
        }
        let guard = self.drain.reply();
        let reply = self.inner.call(req);
        Box::pin(async move {
            let r = reply.await?;
            Ok(r.map(|body| {
                Body::new(Counted {
                    body: Box::pin(body),
                    _guard: guard,
                })
            }))
        })
    }
}

/// A reply's body, counted in flight until it ends or is dropped.
struct Counted<R> {
    body: Pin<Box<R>>,
    _guard: ReplyGuard,
}

impl<R: http_body::Body<Data = Bytes>> http_body::Body for Counted<R> {
    type Data = Bytes;
    type Error = R::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, R::Error>>> {
        self.body.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_are_counted_until_their_guards_go() {
        let d = Arc::new(Drain::default());
        let (a, b) = (d.reply(), d.reply());
        assert_eq!(d.in_flight(), 2);
        assert!(!d.is_stopping());
        assert_eq!(d.begin(), 2);
        assert!(d.is_stopping());
        d.stopping().await;
        drop(a);
        assert_eq!(d.finish_within(Duration::from_millis(20)).await, 1);
        let d2 = d.clone();
        let waiter = tokio::spawn(async move { d2.finish_within(Duration::from_secs(5)).await });
        drop(b);
        assert_eq!(waiter.await.unwrap(), 0);
    }
}
