//! CUDA graphs of the training step (`--cuda-graphs on`): a micro-batch's forward, loss and backward — some
//! 22–27 launches per layer — recorded once per batch shape and replayed as one launch.
//!
//! What makes a replay correct: every kernel parameter of the recorded region is a function of the
//! [`GraphKey`] alone.
//! - Addresses: the activations and the batch live in the activation plan at offsets fixed for the run
//!   (src/model/acts.rs); weights, gradients, the step statistics and the loss scales are the trainer's
//!   buffers, allocated once. The attention backward's scratch is in the plan too. The recorded region
//!   allocates nothing (the CUDA backend refuses allocations, host copies and synchronisation while
//!   recording).
//! - Values that change every step are read from device memory: the step's dropout seed comes with the
//!   batch (`SeqLayout::step_seed`), the loss-gradient scales from the trainer's `loss_scale` tensor, both
//!   written before the replay.
//! - Shapes: rows N (packed batches rounded up to the backend's row bucket), windows B, and the attention
//!   grid's rows (the longest window rounded up, `SeqLayout::grid_rows`) are the key; and whether the
//!   gradient goes to the step's sum or to the accumulation scratch.
//!
//! The first micro-batch of a shape runs as usual (kernels are compiled and loaded, cuBLASLt tunes its
//! algorithms, nothing is recorded); the second is recorded and replayed; later ones are replayed. On the
//! CPU, and with graphs off, every micro-batch simply runs.

use crate::backend::BackendCore;
use anyhow::Result;
use std::collections::HashMap;

/// What [`StepGraphs`] needs of a backend: [`BackendCore`]'s recording calls (every backend has them; the
/// tests also drive a mock).
pub trait Recorder {
    type Graph;
    fn graphs_on(&self) -> bool;
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    fn replay(&self, g: &Self::Graph) -> Result<()>;
}

impl<B: BackendCore> Recorder for B {
    type Graph = B::Graph;
    fn graphs_on(&self) -> bool {
        BackendCore::graphs_on(self)
    }
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<B::Graph> {
        BackendCore::capture(self, f)
    }
    fn replay(&self, g: &B::Graph) -> Result<()> {
        BackendCore::replay(self, g)
    }
}

/// A capture that did not begin because of an earlier fault (one the backend could only report now, such as
/// a failed free): not the shape's, so the shape is tried again at its next batch.
#[derive(Debug)]
pub struct EarlierFault(pub String);

impl std::fmt::Display for EarlierFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EarlierFault {}

/// What determines the recorded work of a micro-batch (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// rows N
    pub rows: usize,
    /// windows B (a filler window included)
    pub windows: usize,
    /// the attention grid's rows
    pub grid_rows: usize,
    /// the gradient goes to the accumulation scratch (a later micro-batch of the step), not the step's sum
    pub into_scratch: bool,
}
// The kernel configuration is not part of the key: the trainer borrows the backend for its whole life, so
// the configuration (`Cuda::set_kernels` takes `&mut`) cannot change under its graphs.

enum Slot<G> {
    /// run once (its warm-up): the next one of this shape is recorded
    Seen,
    Ready(G),
    /// recording failed (a warning said why): this shape runs without a graph
    Failed,
}

/// Counts of what [`StepGraphs::run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// micro-batches run without a graph (graphs off, or a shape's first)
    pub eager: usize,
    /// graphs recorded (each also replayed once)
    pub recorded: usize,
    /// replays of a graph recorded earlier
    pub replayed: usize,
    /// shapes whose recording failed (run without a graph from then on)
    pub failed: usize,
}

/// The recorded micro-batches of one trainer, by shape (`G`: the backend's graph type).
pub struct StepGraphs<G> {
    slots: HashMap<GraphKey, Slot<G>>,
    pub stats: GraphStats,
    /// false: run every micro-batch directly even where the backend records graphs (tests compare the two
    /// on one backend)
    pub enabled: bool,
}

impl<G> Default for StepGraphs<G> {
    fn default() -> Self {
        StepGraphs {
            slots: HashMap::new(),
            stats: GraphStats::default(),
            enabled: true,
        }
    }
}

/// The most shapes kept; past it, all are dropped and recorded again on demand (SQuAD at batch 32 gives
/// some 100–200: row buckets × grid rows × windows with or without a filler × gradient target).
pub const MAX_GRAPHS: usize = 512;

impl<G> StepGraphs<G> {
    /// Run `f` (the micro-batch's device work) for a batch of shape `key`: directly when the backend records
    /// no graphs or the shape is new; recorded then replayed the second time; replayed after that. When a
    /// recording fails, a warning says why, `f` runs directly, and so does every later batch of the shape.
    pub fn run<R: Recorder<Graph = G>>(
        &mut self,
        be: &R,
        key: GraphKey,
        f: &mut dyn FnMut() -> Result<()>,
    ) -> Result<()> {
        if !self.enabled || !be.graphs_on() {
            self.stats.eager += 1;
            return f();
        }
        match self.slots.get(&key) {
            Some(Slot::Ready(g)) => {
                be.replay(g)?;
                self.stats.replayed += 1;
            }
            Some(Slot::Seen) => match be.capture(f) {
                Ok(g) => {
                    be.replay(&g)?;
                    self.slots.insert(key, Slot::Ready(g));
                    self.stats.recorded += 1;
                }
                Err(e) if e.downcast_ref::<EarlierFault>().is_some() => {
                    // nothing was recorded, for a reason that is not the shape's: run the micro-batch now and
                    // record the shape at its next batch (a fault that persists fails the work itself)
                    crate::say!(
                        "warning: CUDA graphs: a micro-batch of {} rows in {} windows was not recorded: {e:#}",
                        key.rows, key.windows
                    );
                    self.stats.eager += 1;
                    f()?;
                }
                Err(e) => {
                    // nothing ran while recording: run the micro-batch now, and this shape without a graph
                    // from now on (a recording that fails is a bug to report, not a reason to stop a run)
                    crate::say!(
                        "warning: CUDA graphs: a micro-batch of {} rows in {} windows failed while being \
                         recorded; it runs again now, and batches of that shape run without a graph: {e:#}",
                        key.rows, key.windows
                    );
                    self.slots.insert(key, Slot::Failed);
                    self.stats.failed += 1;
                    self.stats.eager += 1;
                    f()?;
                }
            },
            Some(Slot::Failed) => {
                self.stats.eager += 1;
                f()?;
            }
            None => {
                f()?;
                if self.slots.len() >= MAX_GRAPHS {
                    self.slots.clear();
                }
                self.slots.insert(key, Slot::Seen);
                self.stats.eager += 1;
            }
        }
        Ok(())
    }

    /// Forget every recording (the buffers they were recorded with are about to change).
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// Shapes with a recorded graph.
    pub fn recorded(&self) -> usize {
        self.slots
            .values()
            .filter(|s| matches!(s, Slot::Ready(_)))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    /// A backend whose "device work" is strings: queued work runs into `ran`, or into the recording.
    #[derive(Default)]
    struct Mock {
        on: bool,
        ran: RefCell<Vec<String>>,
        recording: RefCell<Option<Vec<String>>>,
        fail_next_capture: Cell<bool>,
        fault_before_next_capture: Cell<bool>,
    }
    impl Mock {
        /// A backend that records graphs.
        fn recording() -> Mock {
            Mock {
                on: true,
                ..Mock::default()
            }
        }
        fn queue(&self, op: String) {
            match self.recording.borrow_mut().as_mut() {
                Some(r) => r.push(op),
                None => self.ran.borrow_mut().push(op),
            }
        }
        fn take(&self) -> Vec<String> {
            std::mem::take(&mut *self.ran.borrow_mut())
        }
    }
    impl Recorder for Mock {
        type Graph = Vec<String>;
        fn graphs_on(&self) -> bool {
            self.on
        }
        fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Vec<String>> {
            if self.fault_before_next_capture.replace(false) {
                return Err(EarlierFault("a free failed earlier".into()).into());
            }
            *self.recording.borrow_mut() = Some(vec![]);
            let r = f();
            let g = self.recording.borrow_mut().take().unwrap_or_default();
            r?;
            anyhow::ensure!(!self.fail_next_capture.replace(false), "capture failed");
            Ok(g)
        }
        fn replay(&self, g: &Vec<String>) -> Result<()> {
            self.ran
                .borrow_mut()
                .extend(g.iter().map(|op| format!("{op} (replayed)")));
            Ok(())
        }
    }

    fn key(rows: usize) -> GraphKey {
        GraphKey {
            rows,
            windows: 3,
            grid_rows: 128,
            into_scratch: false,
        }
    }

    #[test]
    fn first_run_then_record_then_replay_per_shape() {
        let be = Mock::recording();
        let mut g = StepGraphs::default();
        // the host-side value the work was queued with: a replay repeats the recorded one
        let step = Cell::new(0);
        let run = |g: &mut StepGraphs<Vec<String>>, rows: usize, s: usize| {
            step.set(s);
            g.run(&be, key(rows), &mut || {
                be.queue(format!("rows {rows} step {}", step.get()));
                Ok(())
            })
            .unwrap();
            be.take()
        };
        assert_eq!(run(&mut g, 128, 0), ["rows 128 step 0"]);
        assert_eq!(run(&mut g, 128, 1), ["rows 128 step 1 (replayed)"]);
        assert_eq!(run(&mut g, 256, 2), ["rows 256 step 2"]);
        // recorded at step 1: what a replay runs is the recording, not the closure
        assert_eq!(run(&mut g, 128, 3), ["rows 128 step 1 (replayed)"]);
        assert_eq!(run(&mut g, 256, 4), ["rows 256 step 4 (replayed)"]);
        assert_eq!(
            g.stats,
            GraphStats {
                eager: 2,
                recorded: 2,
                replayed: 1,
                failed: 0
            }
        );
        assert_eq!(g.recorded(), 2);
        g.clear();
        assert_eq!(run(&mut g, 128, 5), ["rows 128 step 5"]);
    }

    #[test]
    fn a_failed_recording_runs_the_work_and_that_shape_without_graphs() {
        let be = Mock::recording();
        let mut g = StepGraphs::default();
        let mut f = || {
            be.queue("op".into());
            Ok(())
        };
        g.run(&be, key(128), &mut f).unwrap();
        be.fail_next_capture.set(true);
        // the failed recording ran nothing: the work runs directly, once
        g.run(&be, key(128), &mut f).unwrap();
        assert_eq!(be.take(), ["op", "op"]);
        g.run(&be, key(128), &mut f).unwrap();
        assert_eq!(be.take(), ["op"]);
        assert_eq!(g.recorded(), 0);
        assert_eq!(g.stats.failed, 1);
        // other shapes still record
        g.run(&be, key(256), &mut f).unwrap();
        g.run(&be, key(256), &mut f).unwrap();
        assert_eq!(be.take(), ["op", "op (replayed)"]);
        assert_eq!(g.recorded(), 1);
    }

    /// A fault from before the recording (the CUDA backend's failed frees surface there) is not the shape's:
    /// the work runs directly and the shape is recorded at its next batch.
    #[test]
    fn an_earlier_fault_leaves_the_shape_recordable() {
        let be = Mock::recording();
        let mut g = StepGraphs::default();
        let mut f = || {
            be.queue("op".into());
            Ok(())
        };
        g.run(&be, key(128), &mut f).unwrap();
        be.fault_before_next_capture.set(true);
        g.run(&be, key(128), &mut f).unwrap();
        assert_eq!(be.take(), ["op", "op"]);
        assert_eq!((g.recorded(), g.stats.failed), (0, 0));
        g.run(&be, key(128), &mut f).unwrap();
        g.run(&be, key(128), &mut f).unwrap();
        assert_eq!(be.take(), ["op (replayed)", "op (replayed)"]);
        assert_eq!(g.recorded(), 1);
    }

    #[test]
    fn an_error_of_the_work_itself_is_returned() {
        let be = Mock::recording();
        let mut g = StepGraphs::default();
        let e = g
            .run(&be, key(128), &mut || anyhow::bail!("shape mismatch"))
            .unwrap_err();
        assert!(e.to_string().contains("shape mismatch"));
    }

    #[test]
    fn without_graphs_everything_runs() {
        let be = Mock::default();
        let mut g = StepGraphs::default();
        for _ in 0..3 {
            g.run(&be, key(128), &mut || {
                be.queue("op".into());
                Ok(())
            })
            .unwrap();
        }
        assert_eq!(be.take(), ["op", "op", "op"]);
        assert_eq!(g.stats.eager, 3);
        assert_eq!(g.recorded(), 0);
    }
}
