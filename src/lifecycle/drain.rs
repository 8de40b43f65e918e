//! Draining without breaking keep-alive clients.
//!
//! When Pingora stops accepting (SIGTERM, or the end of a socket handover),
//! it calls the app's `cleanup`, and the HTTP proxy's cleanup closes at once
//! every connection that is waiting for its next request. A client that just
//! connected, or is about to reuse an idle connection, then sees a reset. This
//! wrapper delays that cleanup by a short notice period during which every
//! response carries `Connection: close` (see `Process::draining`), so busy
//! clients finish their request and reconnect — to the successor, after a
//! handover — instead of having the connection pulled from under them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use log::info;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;

use crate::model::Process;

pub struct DrainingApp<A> {
    pub inner: Arc<A>,
    pub process: Arc<Process>,
    pub notice: Duration,
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for DrainingApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        session: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        self.inner.process_new(session, shutdown).await
    }

    fn accept_error(&self, error: &pingora::Error) -> bool {
        self.inner.accept_error(error)
    }

    fn handshake_error(
        &self,
        peer: Option<&pingora::protocols::l4::socket::SocketAddr>,
        error: &pingora::Error,
    ) -> bool {
        self.inner.handshake_error(peer, error)
    }

    async fn cleanup(&self) {
        self.process.draining.store(true, Ordering::Relaxed);
        info!(
            "draining: answering with Connection: close for {:?} before closing idle connections",
            self.notice
        );
        tokio::time::sleep(self.notice).await;
        self.inner.cleanup().await;
    }
}
