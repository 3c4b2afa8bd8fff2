//! The `pohmel://` client as the write-back layer's [`Sink`]: each attempt
//! is one transaction sent to one store server, acknowledged once durable
//! there (`client.rs` does the sending, resending and fencing).

use std::sync::Arc;

use super::client::RemoteStore;
use crate::store::sink::{SendFuture, Sink};
use crate::store::Txn;

/// Store servers over the wire protocol as a sink.
pub struct RemoteSink {
    remote: Arc<RemoteStore>,
}

impl RemoteSink {
    pub fn new(remote: Arc<RemoteStore>) -> RemoteSink {
        RemoteSink { remote }
    }
}

impl Sink for RemoteSink {
    fn servers(&self) -> usize {
        self.remote.servers().len()
    }

    fn server_name(&self, server: usize) -> String {
        let s = self.remote.servers();
        s[server % s.len()].clone()
    }

    fn session(&self) -> u64 {
        self.remote.session()
    }

    fn send(&self, server: usize, txn_id: u64, low_water: u64, txn: Txn) -> SendFuture<'_> {
        Box::pin(self.remote.send_txn(server, txn_id, low_water, txn))
    }
}
