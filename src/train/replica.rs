//! Data-parallel training: one leader, several followers, each a [`Trainer`] with its own device, activation
//! plan and copy of the weights and optimizer state.
//!
//! The leader (rank 0) runs the ordinary loop ([`super::run`]): it reads the data, logs, evaluates, saves.
//! Whenever it takes a step or needs logits it first sends the command, with the windows, to every
//! follower (`Cmd`); then all replicas run the same code (`Trainer::step_replica`,
//! `Trainer::logits_replica`) on their own share and meet in the collective (gradient sum, logits
//! gather). Followers do nothing else, so everything a run writes comes from rank 0, a Ctrl-C stops every
//! replica at the same step (the leader simply sends no further step), and a checkpoint is the leader's:
//! `--resume` with another number of devices starts by sending the restored weights, moments and step
//! counters to every replica ([`Trainer::join_group`]).

use super::{TrainConfig, TrainState, Trainer};
use crate::collective::wire::{self, Reader, Writer};
use crate::collective::Collective;
use crate::data::features::Feature;
use crate::model::bert::grad_dtype;
use crate::model::{BertConfig, BertParams};
use crate::ops::Backend;
use crate::optim::LossScaler;
use crate::tensor::DType;
use anyhow::{bail, Context, Result};

const STEP: u64 = 1;
const LOGITS: u64 = 2;
const STOP: u64 = 3;
const CHECK: u64 = 4;

/// What the leader sends to start a follower: enough to build the same trainer.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    model: BertConfig,
    train: TrainConfig,
    precision: String,
    mask_padding_in_loss: bool,
    state: TrainState,
}

/// The counters a step depends on besides the windows: the dropout stream's step, Adam's bias-correction
/// step, the loss scale (the leader's copies are authoritative; followers take them with every step).
#[derive(serde::Serialize, serde::Deserialize)]
struct StepHeader {
    global_step: usize,
    adam_t: u64,
    scaler: LossScaler,
    /// the learning rate's bits (JSON would round some f64 by an ulp)
    lr_bits: u64,
}

impl<'a, B: Backend> Trainer<'a, B> {
    /// Become one replica of a data-parallel run. The leader (rank 0) sends its configuration, weights,
    /// optimizer moments and counters; a follower receives them ([`follow`] builds it first). The
    /// activation plan is re-sized for this replica's share of a step, and MFU is measured against the
    /// peak of all devices together.
    pub fn join_group(&mut self, group: Box<dyn Collective<B>>) -> Result<()> {
        let be = self.be;
        let (rank, world) = (group.rank(), group.world());
        // this replica's share of a step: a smaller plan (the old one freed first, down to a one-row
        // placeholder, and its memory given back to the device rather than kept for reuse at sizes the new
        // plan does not have)
        let dt = self.model.dtype();
        self.plan = crate::model::ActPlan::new(be, &self.model.cfg, 1, 1, dt, true)?;
        be.release_cached()?;
        self.plan = Self::plan_for(be, &self.model.cfg, &self.cfg, dt, world)?;
        // graphs recorded with the old plan's addresses must not be replayed
        self.graphs.clear();
        if let Some(p) = self.peak.as_mut() {
            p.tflops *= world as f64;
            p.source = format!("{} × {world} devices", p.source);
        }
        let bufs: Vec<&mut BertParams<B>> = {
            let mut v = vec![];
            if let Some(m) = self.master.as_mut() {
                v.push(m);
            }
            v.push(&mut self.model.params);
            v.push(&mut self.m);
            v.push(&mut self.v);
            v
        };
        for p in bufs {
            group.broadcast(be, p.flat_mut(), 0).with_context(|| {
                format!("replica {rank}: receiving (or, rank 0, sending) the weights and moments")
            })?;
        }
        be.synchronize()?;
        self.group = Some(group);
        Ok(())
    }

    /// The leader ends the run for every follower (they return from [`follow`]), after checking that
    /// every replica holds the same weights and optimizer state as itself; a no-op elsewhere.
    pub fn leave_group(&mut self) -> Result<()> {
        let check = self.verify_replicas();
        if let Some(g) = self.group.take() {
            if g.rank() == 0 {
                let mut b = Writer::default();
                b.u64(STOP);
                g.broadcast_bytes(self.be, &mut b.0, 0)?;
            }
        }
        check
    }

    /// The leader: ask every replica for a digest (SHA-256) of its weights, moments and counters and
    /// compare them with its own — the replicas must be identical after every step; an error names the
    /// first that is not.
    pub fn verify_replicas(&mut self) -> Result<()> {
        if !self.is_leader_of_group() {
            return Ok(());
        }
        let mut w = Writer::default();
        w.u64(CHECK);
        send(self, w)?;
        self.digest_replica()
    }

    /// Every replica's side of [`Trainer::verify_replicas`].
    fn digest_replica(&mut self) -> Result<()> {
        use sha2::Digest;
        let be = self.be;
        let mut h = sha2::Sha256::new();
        let mut bufs = vec![&self.model.params, &self.m, &self.v];
        if let Some(m) = self.master.as_ref() {
            bufs.push(m);
        }
        for p in bufs {
            let f = p.flat();
            h.update(
                f.to_f64_vec(be)?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect::<Vec<u8>>(),
            );
        }
        h.update(self.state.adam_t.to_le_bytes());
        h.update(self.scaler.scale.to_le_bytes());
        let mine = h.finalize().to_vec();
        let Some(g) = &self.group else {
            return Ok(());
        };
        if let Some(all) = g.gather_bytes(be, &mine, 0)? {
            for (r, d) in all.iter().enumerate() {
                if d != &all[0] {
                    bail!(
                        "replica {r} of {} no longer holds the leader's weights and optimizer state \
                         (its digest differs): the replicas have diverged",
                        all.len()
                    );
                }
            }
        }
        Ok(())
    }

    /// A description of the replica group (None without one).
    pub fn group_description(&self) -> Option<String> {
        self.group.as_ref().map(|g| g.describe())
    }

    fn is_leader_of_group(&self) -> bool {
        self.group.as_ref().map(|g| g.rank() == 0).unwrap_or(false)
    }
}

/// The leader's half of a step: send it to the followers (nothing without a group).
pub(crate) fn lead_step<B: Backend>(t: &Trainer<B>, feats: &[&Feature], lr: f64) -> Result<()> {
    if !t.is_leader_of_group() {
        return Ok(());
    }
    let head = StepHeader {
        global_step: t.state.global_step,
        adam_t: t.state.adam_t,
        scaler: t.scaler.clone(),
        lr_bits: lr.to_bits(),
    };
    let mut w = Writer::default();
    w.u64(STEP).bytes(&serde_json::to_vec(&head)?);
    wire::write_features(&mut w, feats);
    send(t, w)
}

/// The leader's half of an evaluation: send the windows to the followers.
pub(crate) fn lead_logits<B: Backend>(t: &Trainer<B>, feats: &[&Feature]) -> Result<()> {
    if !t.is_leader_of_group() {
        return Ok(());
    }
    let mut w = Writer::default();
    w.u64(LOGITS);
    wire::write_features(&mut w, feats);
    send(t, w)
}

fn send<B: Backend>(t: &Trainer<B>, mut w: Writer) -> Result<()> {
    match &t.group {
        Some(g) => g.broadcast_bytes(t.be, &mut w.0, 0),
        None => Ok(()),
    }
}

/// The leader's side of starting a follower: its configuration, sent before [`Trainer::join_group`].
pub fn greet<B: Backend>(t: &Trainer<B>, group: &dyn Collective<B>) -> Result<()> {
    let hello = Hello {
        model: t.model.cfg.clone(),
        train: t.cfg.clone(),
        precision: t.model.dtype().to_string(),
        mask_padding_in_loss: t.model.mask_padding_in_loss,
        state: t.state.clone(),
    };
    let mut b = serde_json::to_vec(&hello)?;
    group.broadcast_bytes(t.be, &mut b, 0)
}

/// Start the leader of a group: greet the followers, then send them the weights.
pub fn lead<B: Backend>(t: &mut Trainer<B>, group: Box<dyn Collective<B>>) -> Result<()> {
    if group.rank() != 0 {
        bail!("lead: this replica is rank {}, not 0", group.rank());
    }
    if t.cfg.batch_size < group.world() {
        bail!(
            "--batch-size {} (the run's) gives some of the {} devices no window: give at least one per device",
            t.cfg.batch_size,
            group.world()
        );
    }
    greet(t, group.as_ref())?;
    t.join_group(group)
}

/// A follower: build the leader's trainer on `be`, then take its steps and evaluations until it stops.
/// On an error it leaves the group saying why (the leader's next collective fails with that reason).
pub fn follow<B: Backend>(be: &B, group: Box<dyn Collective<B>>) -> Result<()> {
    let rank = group.rank();
    follow_inner(be, group).with_context(|| format!("replica {rank}"))
}

fn follow_inner<B: Backend>(be: &B, group: Box<dyn Collective<B>>) -> Result<()> {
    let mut hello = vec![];
    group.broadcast_bytes(be, &mut hello, 0)?;
    let mut t = match start_follower(be, &hello) {
        Ok(t) => t,
        Err(e) => {
            group.abort(&format!("{e:#}"));
            return Err(e);
        }
    };
    t.join_group(group)?;
    let res = serve(&mut t);
    if let (Err(e), Some(g)) = (&res, &t.group) {
        g.abort(&format!("{e:#}"));
    }
    res
}

fn start_follower<'a, B: Backend>(be: &'a B, hello: &[u8]) -> Result<Trainer<'a, B>> {
    let hello: Hello =
        serde_json::from_slice(hello).context("the leader's configuration message")?;
    let precision = DType::parse(&hello.precision)?;
    let master = BertParams::zeros(be, &hello.model, grad_dtype(precision))?;
    let mut t = Trainer::new(be, hello.model, master, precision, hello.train)?;
    t.model.mask_padding_in_loss = hello.mask_padding_in_loss;
    t.state = hello.state;
    Ok(t)
}

fn serve<B: Backend>(t: &mut Trainer<B>) -> Result<()> {
    let be = t.be;
    loop {
        let mut msg = vec![];
        if let Some(g) = &t.group {
            g.broadcast_bytes(be, &mut msg, 0)?;
        }
        let mut r = Reader::new(&msg);
        match r.u64()? {
            STEP => {
                let head: StepHeader = serde_json::from_slice(r.bytes()?)?;
                let feats = wire::read_features(&mut r)?;
                r.done()?;
                t.state.global_step = head.global_step;
                t.state.adam_t = head.adam_t;
                t.scaler = head.scaler;
                let refs: Vec<&Feature> = feats.iter().collect();
                t.step_replica(&refs, f64::from_bits(head.lr_bits))?;
            }
            LOGITS => {
                let feats = wire::read_features(&mut r)?;
                r.done()?;
                let refs: Vec<&Feature> = feats.iter().collect();
                t.logits_replica(&refs)?;
            }
            CHECK => t.digest_replica()?,
            STOP => return Ok(()),
            other => bail!("unknown command {other} from the leader"),
        }
    }
}
