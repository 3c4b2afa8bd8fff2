//! SlateDB's compactor, run beside the engine rather than inside it: it
//! starts once the volume is open (its start fences the last compactor
//! with two synced writes, which need not hold the open up), and it stops
//! before the engine closes.

use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::config;

/// The compactor and the task that runs it.
pub(super) struct Compactor {
    compactor: Arc<slatedb::compactor::Compactor>,
    run: Mutex<Option<JoinHandle<()>>>,
}

impl Compactor {
    /// Build the compactor of the volume `cfg` names and start it on `rt`.
    pub(super) fn start(
        rt: &tokio::runtime::Runtime,
        cfg: &config::VolumeConfig,
        options: slatedb::config::CompactorOptions,
        describe: String,
    ) -> Compactor {
        let compactor = {
            let _in = rt.enter();
            slatedb::CompactorBuilder::new(cfg.db_path.clone(), cfg.object_store.clone())
                .with_options(options)
                .with_sst_block_size(config::sst_block_size())
                .build()
        };
        let compactor = Arc::new(compactor);
        let running = compactor.clone();
        let run = rt.spawn(async move {
            if let Err(e) = running.run().await {
                let fenced = slatedb::ErrorKind::Closed(slatedb::CloseReason::Fenced);
                if e.kind() != fenced {
                    tracing::warn!(volume = %describe, error = %e, "the engine's compactor stopped");
                }
            }
        });
        Compactor {
            compactor,
            run: Mutex::new(Some(run)),
        }
    }

    /// Stop the compactor. The task running it ends first: a close right
    /// after the open (`pohmelfs format`) can find the compactor still
    /// starting, and a task it started after the stop would run until the
    /// runtime's end cancelled it (SlateDB logs that as an error, and a
    /// late start would claim the compactor's epoch over the next opener's).
    pub(super) async fn stop(&self) -> Result<(), slatedb::Error> {
        let run = self.run.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(run) = run {
            run.abort();
            // Cancelled, or done: either way the run starts nothing more.
            let _ = run.await;
        }
        self.compactor.stop().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Stopped at once, again and again (a close right after the open,
    /// while the compactor may still be starting), and once under way: no
    /// task of the compactor's is left running on its runtime, to be
    /// cancelled by the runtime's end.
    #[test]
    fn a_stopped_compactor_leaves_no_task_behind() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/vol", dir.path().display());
        super::super::SlateStore::format(&url, None).unwrap();
        let cfg = config::parse_with(&url, false).unwrap();
        let options = cfg.settings.compactor_options.clone().unwrap();
        for round in 0..20 {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let c = Compactor::start(&rt, &cfg, options.clone(), "test".into());
            if round == 19 {
                // Under way: its tasks run (more than the task running it).
                let running = pohmelfs_testkit::wait_until(
                    Duration::from_secs(30),
                    Duration::from_millis(2),
                    || (rt.metrics().num_alive_tasks() > 1).then_some(()),
                );
                assert!(running.is_some(), "the compactor never got under way");
            }
            let stopped = rt.block_on(c.stop());
            assert!(stopped.is_ok(), "round {round}: {stopped:?}");
            let idle = pohmelfs_testkit::wait_until(
                Duration::from_secs(10),
                Duration::from_millis(2),
                || (rt.metrics().num_alive_tasks() == 0).then_some(()),
            );
            assert!(
                idle.is_some(),
                "round {round}: {} tasks alive after the stop",
                rt.metrics().num_alive_tasks()
            );
        }
    }
}
