//! The in-process actor system: a scheduler actor driving worker links (an executor
//! thread, or worker processes over gRPC), each supervised by a worker actor. Actors are
//! thin shells: every decision is made by the plain [`Scheduler`]; the actors move
//! messages, run steps off the async runtime, and restart a worker whose executor died
//! (its sequences go back to the queue, nothing is lost).
//!
//! Flow: a front calls [`EngineHandle::submit`] (non-blocking; a bounded admission count
//! turns overload into an immediate error) -> `SchedulerMsg::Submit` -> the scheduler
//! plans a step and hands it to every worker's link itself -> each executor thread
//! answers into the step's [`Gather`], and the last answer sends `SchedulerMsg::StepDone`
//! -> token events to each request's channel -> next step. A step crosses two threads:
//! the scheduler's to the executors' and back. A watchdog task fails a step whose
//! answers do not come.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hyserve_worker::{ExecutorError, ExecutorHandle, Step, StepOutput};
use ractor::{Actor, ActorProcessingErr, ActorRef, ActorStatus, SupervisionEvent};
use tokio::sync::mpsc;

use crate::api::{
    Engine, EngineStats, GenerateRequest, Health, HistogramCounts, ModelInfo, ServeError,
    TokenEvent, TokenStream,
};
use crate::scheduler::{Plan, Scheduler, SchedulerConfig, SeqId};

/// Where a step's result goes.
pub type Reply = Box<dyn FnOnce(Result<StepOutput, String>) + Send>;

/// How the engine reaches one worker: an executor thread in this process, or a worker
/// process over gRPC.
pub trait WorkerLink: Send + Sync + 'static {
    /// Starts `step`; `reply` is called with its result (or dropped unanswered if the
    /// worker dies).
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String>;
    /// Whether the worker can take steps.
    fn is_alive(&self) -> bool;
}

impl WorkerLink for ExecutorHandle {
    fn submit(&self, step: Step, reply: Reply) -> Result<(), String> {
        self.submit_with(step, move |r| {
            reply(r.map_err(|e: ExecutorError| e.to_string()))
        })
        .map_err(|e| e.to_string())
    }

    fn is_alive(&self) -> bool {
        ExecutorHandle::is_alive(self)
    }
}

/// Builds a fresh link to worker `i` (used at start and after a crash).
pub type ExecutorFactory = Arc<dyn Fn(usize) -> std::io::Result<Box<dyn WorkerLink>> + Send + Sync>;

/// Everything the engine needs to start.
#[derive(Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub model: ModelInfo,
    /// A step that takes longer than this marks the engine not ready (and is logged).
    pub step_timeout: Duration,
    /// Expert parallelism: every worker takes part in every step (those without
    /// sequences get an empty one), steps are numbered, and carry the placement epoch.
    pub lockstep: bool,
}

/// Messages to the scheduler actor.
pub enum SchedulerMsg {
    /// A new request with its event channel (admission was counted by the handle).
    Submit {
        id: SeqId,
        request: GenerateRequest,
        seed: u64,
        events: mpsc::Sender<TokenEvent>,
    },
    /// The client went away: free the sequence.
    Cancel(SeqId),
    /// A step finished (or a worker failed it).
    StepDone {
        plan: Plan,
        outputs: Result<Vec<StepOutput>, String>,
        model_seconds: f64,
    },
    /// Worker `i` was restarted with a fresh executor.
    WorkerRestarted(usize, ActorRef<WorkerMsg>, Arc<dyn WorkerLink>),
    /// The pause after repeated failed steps is over: plan again.
    Retry,
    /// Stop starting steps; answer once none is in flight.
    Pause(tokio::sync::oneshot::Sender<()>),
    /// Start steps again; workers `reset` lost their KV caches meanwhile.
    Resume { reset: Vec<usize> },
}

/// Messages to a worker actor.
pub enum WorkerMsg {
    /// The scheduler found the worker's link dead: fail, so the supervisor restarts it.
    Failed(String),
}

/// A worker actor: supervises one worker link, which the scheduler also holds and hands
/// steps to directly (the actor is not on a step's path).
struct WorkerActor;

struct WorkerState {
    /// Held for as long as the actor lives: a dead link is dropped with it.
    _link: Arc<dyn WorkerLink>,
}

impl Actor for WorkerActor {
    type Msg = WorkerMsg;
    type State = WorkerState;
    type Arguments = Arc<dyn WorkerLink>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        link: Arc<dyn WorkerLink>,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(WorkerState { _link: link })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // Crash the actor, not the process: the supervisor restarts it.
            WorkerMsg::Failed(why) => Err(why.into()),
        }
    }
}

/// The answers of one step's workers, gathered on the threads they arrive on (executor
/// threads, or the tasks awaiting worker processes): the last answer sends the step's
/// result to the scheduler's mailbox. The step ends once: by its last answer, or by the
/// watchdog's timeout, whichever comes first (a later answer is dropped).
struct Gather {
    me: ActorRef<SchedulerMsg>,
    shared: Arc<Shared>,
    /// When the first worker was handed the step.
    sent: Instant,
    /// The workers whose outputs go back to the scheduler, in the plan's order.
    planned: Vec<usize>,
    inner: Mutex<GatherInner>,
}

struct GatherInner {
    /// The step's plan until the step ends.
    plan: Option<Plan>,
    results: Vec<Option<StepOutput>>,
    left: usize,
    failure: Option<String>,
}

impl Gather {
    /// Worker `i`'s answer.
    fn answer(&self, i: usize, r: Result<StepOutput, String>) {
        let Ok(mut g) = self.inner.lock() else { return };
        if g.plan.is_none() {
            return;
        }
        match r {
            Ok(out) => g.results[i] = Some(out),
            Err(e) => g.failure = Some(e),
        }
        g.left -= 1;
        if g.left > 0 {
            return;
        }
        let plan = g.plan.take().expect("checked above");
        let outputs = match g.failure.take() {
            Some(e) => Err(e),
            None => {
                if self.shared.lockstep
                    && let Ok(mut load) = self.shared.expert_load.lock()
                {
                    for r in g.results.iter().flatten() {
                        if load.len() < r.expert_load.len() {
                            load.resize(r.expert_load.len(), 0);
                        }
                        for (a, b) in load.iter_mut().zip(&r.expert_load) {
                            *a += b;
                        }
                    }
                }
                Ok(self
                    .planned
                    .iter()
                    .map(|&w| g.results[w].take().unwrap_or_default())
                    .collect())
            }
        };
        drop(g);
        let _ = self.me.cast(SchedulerMsg::StepDone {
            plan,
            outputs,
            model_seconds: self.sent.elapsed().as_secs_f64(),
        });
    }

    /// Ends the step as failed if it is still waiting for answers.
    fn time_out(&self) {
        let plan = self.inner.lock().ok().and_then(|mut g| g.plan.take());
        if let Some(plan) = plan {
            let _ = self.me.cast(SchedulerMsg::StepDone {
                plan,
                outputs: Err("step timed out".into()),
                model_seconds: self.sent.elapsed().as_secs_f64(),
            });
        }
    }
}

/// Worker `i`'s answer to a step: given once, or, if dropped unanswered (its executor
/// died with the step), a failure.
struct Answer {
    gather: Arc<Gather>,
    i: usize,
    given: bool,
}

impl Answer {
    fn give(mut self, r: Result<StepOutput, String>) {
        self.given = true;
        self.gather.answer(self.i, r);
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        if !self.given {
            self.gather
                .answer(self.i, Err("worker died during the step".into()));
        }
    }
}

/// The scheduler actor is stopping or stopped: its helper tasks end.
fn stopping(me: &ActorRef<SchedulerMsg>) -> bool {
    matches!(
        me.get_status(),
        ActorStatus::Stopping | ActorStatus::Stopped
    )
}

/// Fails the step in flight once it has waited four step timeouts for its answers
/// (checked every half timeout, at most every 10 ms); ends with the scheduler actor.
async fn watchdog(me: ActorRef<SchedulerMsg>, shared: Arc<Shared>) {
    let limit = shared.step_timeout * 4;
    let every = (shared.step_timeout / 2).max(Duration::from_millis(10));
    loop {
        tokio::time::sleep(every).await;
        if stopping(&me) {
            return;
        }
        let step = shared
            .in_flight
            .lock()
            .ok()
            .and_then(|s| s.as_ref().and_then(Weak::upgrade));
        if let Some(g) = step
            && g.sent.elapsed() > limit
        {
            g.time_out();
        }
    }
}

/// State shared between the handle (fronts' threads) and the scheduler actor.
struct Shared {
    /// Requests submitted and not yet finished: the admission bound.
    outstanding: AtomicUsize,
    max_outstanding: usize,
    next_id: AtomicU64,
    stats: Mutex<EngineStats>,
    /// Unix millis of the last completed step, and whether work is pending.
    last_progress_ms: AtomicU64,
    busy: AtomicBool,
    started: AtomicBool,
    workers_alive: AtomicUsize,
    n_workers: usize,
    step_timeout: Duration,
    lockstep: bool,
    /// The placement epoch steps run under (expert parallelism).
    epoch: AtomicU64,
    /// Rows routed per `[layer][expert]` (flattened) since last taken.
    expert_load: Mutex<Vec<u64>>,
    /// Rebalances done and how long each took.
    rebalances: Mutex<HistogramCounts>,
    /// The step in flight, for the watchdog.
    in_flight: Mutex<Option<Weak<Gather>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct SchedulerActor;

struct SchedulerState {
    scheduler: Scheduler,
    workers: Vec<ActorRef<WorkerMsg>>,
    /// Each worker's link, which steps are handed to directly.
    links: Vec<Arc<dyn WorkerLink>>,
    streams: std::collections::HashMap<SeqId, mpsc::Sender<TokenEvent>>,
    in_flight: bool,
    shared: Arc<Shared>,
    factory: ExecutorFactory,
    /// The number of the next lockstep step.
    next_step: u64,
    /// When the step in flight was planned: its wall time runs from here to the end of
    /// its completion.
    planned_at: Instant,
    paused: bool,
    pause_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Workers known dead and not yet restarted: no step is planned while any is, as
    /// every step would fail at once.
    down: Vec<bool>,
    /// Steps failed since the fault began (a success ends it only once it leaves no
    /// suspect: those of the steps singling out its culprit do not); from the
    /// second on, the next step waits [`retry_delay`] (a worker that keeps failing its
    /// steps is not hammered).
    failed_in_a_row: u32,
    /// A retry is scheduled (`SchedulerMsg::Retry`).
    retry_pending: bool,
    /// The sequences that were in every one of the `failed_in_a_row` failed steps and
    /// have produced no token since (sorted): the suspects of a fault that follows a
    /// request. While there are any, steps hold only `probe`.
    suspects: Vec<SeqId>,
    /// The suspects the next steps may hold (sorted): after a failure the first half of
    /// them; once those all produce a token, the rest.
    probe: Vec<SeqId>,
}

impl SchedulerState {
    /// Worker `w`'s link is dead: it is down, and its actor fails so that the
    /// supervisor restarts it.
    fn fail_worker(&mut self, w: usize, why: String) {
        self.down[w] = true;
        self.publish_alive();
        let _ = self.workers[w].cast(WorkerMsg::Failed(why));
    }

    /// A step of `ids` (sorted) failed, the `failed_in_a_row`th: the suspects are those
    /// of them that were in every failed step since the fault began (all of `ids` if
    /// none was), and the next steps hold the first half of them only. Halving on each
    /// failure singles out a request that breaks every step it is in, where its batch
    /// would fail with it.
    fn suspect(&mut self, ids: Vec<SeqId>) {
        let kept: Vec<SeqId> = self
            .suspects
            .iter()
            .copied()
            .filter(|id| ids.binary_search(id).is_ok())
            .collect();
        if kept.is_empty() {
            // A fault of other sequences: it is counted afresh.
            self.failed_in_a_row = 1;
            self.suspects = ids;
        } else {
            self.suspects = kept;
        }
        self.probe = self.suspects[..self.suspects.len().div_ceil(2)].to_vec();
        self.scheduler.restrict(Some(self.probe.clone()));
    }

    /// A step succeeded while there were suspects: those that produced a token in it
    /// (`produced`, sorted) or are gone are cleared. The steps go on holding the rest of
    /// the probe, then the suspects not yet probed; with no suspect left the fault has
    /// passed.
    fn clear_suspects(&mut self, produced: &[SeqId]) {
        let streams = &self.streams;
        let guilty = |id: &SeqId| streams.contains_key(id) && produced.binary_search(id).is_err();
        self.suspects.retain(guilty);
        self.probe.retain(guilty);
        if self.suspects.is_empty() {
            self.failed_in_a_row = 0;
            self.scheduler.restrict(None);
            tracing::info!(
                "the failing steps' culprit did not fail again; steps hold every sequence"
            );
            return;
        }
        if self.probe.is_empty() {
            self.probe = self.suspects.clone();
        }
        self.scheduler.restrict(Some(self.probe.clone()));
    }

    /// `workers_alive` (health, `/metrics`) is the workers not down.
    fn publish_alive(&self) {
        let alive = self.down.iter().filter(|&&d| !d).count();
        self.shared.workers_alive.store(alive, Ordering::Release);
    }
}

/// Failed steps, since a fault began, with the same sequences in all of them and no
/// token of theirs in between, before those sequences' requests are failed: a request
/// that breaks every step it is in (a "query of death") would otherwise be retried
/// forever. Below the limit a fault is taken for a passing one (a worker that died and
/// came back). Each failure halves the suspects, so a lone culprit is singled out of a
/// batch of up to 128 before its requests fail; a bigger batch loses 2 or more.
const MAX_FAILED_STEPS: u32 = 8;

/// How long to wait before planning again after `failed` steps failed in a row: none
/// after one (a lone failure is retried at once), then 10 ms doubling up to 1 s.
fn retry_delay(failed: u32) -> Duration {
    if failed < 2 {
        return Duration::ZERO;
    }
    Duration::from_millis(10u64 << (failed - 2).min(7)).min(Duration::from_secs(1))
}

struct SchedulerArgs {
    config: SchedulerConfig,
    shared: Arc<Shared>,
    factory: ExecutorFactory,
}

impl SchedulerActor {
    /// Plans and launches the next step if none is in flight.
    fn kick(&self, myself: &ActorRef<SchedulerMsg>, st: &mut SchedulerState) {
        if st.in_flight {
            return;
        }
        if st.paused {
            for w in st.pause_waiters.drain(..) {
                let _ = w.send(());
            }
            return;
        }
        if st.retry_pending {
            return;
        }
        // An empty list does not allocate: this costs a step nothing while all is well.
        let dead: Vec<usize> = (0..st.links.len())
            .filter(|&w| !st.down[w] && !st.links[w].is_alive())
            .collect();
        for w in dead {
            st.fail_worker(w, "executor thread died".into());
        }
        if st.down.iter().any(|&d| d) {
            // Steps resume when the worker is back (`WorkerRestarted`).
            return;
        }
        let t0 = Instant::now();
        let Some(plan) = st.scheduler.schedule() else {
            st.shared.busy.store(false, Ordering::Relaxed);
            return;
        };
        st.planned_at = t0;
        st.in_flight = true;
        st.shared.busy.store(true, Ordering::Relaxed);
        // Under lockstep every worker gets a step (an empty one if it has no
        // sequences); only the planned workers' outputs go back to the scheduler.
        let calls: Vec<(usize, Step)> = if st.shared.lockstep {
            let (id, epoch) = (st.next_step, st.shared.epoch.load(Ordering::Acquire));
            st.next_step += 1;
            (0..st.links.len())
                .map(|w| {
                    let mut step = plan
                        .steps
                        .iter()
                        .find(|(pw, _)| *pw == w)
                        .map(|(_, s)| s.clone())
                        .unwrap_or_default();
                    step.step_id = id;
                    step.epoch = epoch;
                    (w, step)
                })
                .collect()
        } else {
            plan.steps
                .iter()
                .map(|(w, step)| (*w, step.clone()))
                .collect()
        };
        let planned: Vec<usize> = if st.shared.lockstep {
            plan.steps.iter().map(|(w, _)| *w).collect()
        } else {
            (0..calls.len()).collect()
        };
        self.add_scheduler_time(st, t0);
        // Workers run concurrently: every step is handed over before any answer is
        // in, straight to the worker's link (its executor thread's queue); the answers
        // meet in the step's gather, and the last sends the result to this mailbox.
        let gather = Arc::new(Gather {
            me: myself.clone(),
            shared: st.shared.clone(),
            sent: Instant::now(),
            planned,
            inner: Mutex::new(GatherInner {
                plan: Some(plan),
                results: (0..calls.len()).map(|_| None).collect(),
                left: calls.len(),
                failure: None,
            }),
        });
        if let Ok(mut s) = st.shared.in_flight.lock() {
            *s = Some(Arc::downgrade(&gather));
        }
        for (i, (w, step)) in calls.into_iter().enumerate() {
            let answer = Answer {
                gather: gather.clone(),
                i,
                given: false,
            };
            if let Err(why) = st.links[w].submit(step, Box::new(move |r| answer.give(r))) {
                // The step fails (its answer was dropped with the closure) and its
                // sequences are requeued.
                st.fail_worker(w, why);
            }
        }
    }

    /// The suspects' requests fail with an internal error, after [`MAX_FAILED_STEPS`]
    /// failed steps with them all in it and no token of theirs in between; the other
    /// sequences go on.
    fn give_up(&self, st: &mut SchedulerState, error: &str) {
        let suspects = std::mem::take(&mut st.suspects);
        st.probe.clear();
        st.scheduler.restrict(None);
        let message = format!(
            "this request was in {} failed steps, with no token of its own in between; the last error: {error}",
            st.failed_in_a_row
        );
        tracing::error!(
            requests = suspects.len(),
            failed_in_a_row = st.failed_in_a_row,
            error,
            "giving up on the requests that were in every failed step"
        );
        st.failed_in_a_row = 0;
        for &id in &suspects {
            st.scheduler.cancel(id);
        }
        if let Ok(mut s) = st.shared.stats.lock() {
            s.requests_given_up_total += suspects.len() as u64;
        }
        let failed = ServeError::Internal { message };
        let events = suspects
            .into_iter()
            .map(|id| (id, TokenEvent::Failed(failed.clone())))
            .collect();
        self.deliver(st, events);
    }

    fn add_scheduler_time(&self, st: &SchedulerState, t0: Instant) {
        if let Ok(mut s) = st.shared.stats.lock() {
            s.scheduler_seconds_total += t0.elapsed().as_secs_f64();
        }
    }

    fn deliver(&self, st: &mut SchedulerState, events: Vec<(SeqId, TokenEvent)>) {
        for (id, ev) in events {
            let done = matches!(ev, TokenEvent::Finished { .. } | TokenEvent::Failed(_));
            let gone = match st.streams.get(&id) {
                // The channel holds max_tokens + 2 events, so try_send fails only when the
                // receiver is gone: the client left.
                Some(tx) => tx.try_send(ev).is_err(),
                None => true,
            };
            if gone && !done {
                st.scheduler.cancel(id);
            }
            if (done || gone) && st.streams.remove(&id).is_some() {
                st.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    fn publish_stats(&self, st: &SchedulerState) {
        let s = st.scheduler.stats();
        if let Ok(mut g) = st.shared.stats.lock() {
            // The engine's own timing totals are kept; the rest is the scheduler's (the
            // old stats are moved out, not cloned: this runs on every step).
            let timing = std::mem::take(&mut *g);
            *g = EngineStats {
                scheduler_seconds_total: timing.scheduler_seconds_total,
                model_seconds_total: timing.model_seconds_total,
                worker_seconds_total: timing.worker_seconds_total,
                forward_seconds_total: timing.forward_seconds_total,
                worker_queued_seconds_total: timing.worker_queued_seconds_total,
                step_seconds_total: timing.step_seconds_total,
                steps_failed_total: timing.steps_failed_total,
                requests_given_up_total: timing.requests_given_up_total,
                ..s
            };
        }
    }
}

impl Actor for SchedulerActor {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: SchedulerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let mut workers = Vec::with_capacity(args.config.n_workers);
        let mut links = Vec::with_capacity(args.config.n_workers);
        for i in 0..args.config.n_workers {
            let link: Arc<dyn WorkerLink> = Arc::from((args.factory)(i)?);
            let (w, _) =
                Actor::spawn_linked(None, WorkerActor, link.clone(), myself.get_cell()).await?;
            workers.push(w);
            links.push(link);
        }
        tokio::spawn(watchdog(myself.clone(), args.shared.clone()));
        args.shared
            .workers_alive
            .store(workers.len(), Ordering::Release);
        args.shared.started.store(true, Ordering::Release);
        args.shared
            .last_progress_ms
            .store(now_ms(), Ordering::Release);
        Ok(SchedulerState {
            down: vec![false; workers.len()],
            scheduler: Scheduler::new(args.config),
            workers,
            links,
            streams: Default::default(),
            in_flight: false,
            shared: args.shared,
            factory: args.factory,
            next_step: 1,
            planned_at: Instant::now(),
            paused: false,
            pause_waiters: Vec::new(),
            failed_in_a_row: 0,
            retry_pending: false,
            suspects: Vec::new(),
            probe: Vec::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit {
                id,
                request,
                seed,
                events,
            } => {
                let t0 = Instant::now();
                match st.scheduler.add(id, request, seed) {
                    Ok(()) => {
                        st.streams.insert(id, events);
                    }
                    Err(e) => {
                        let _ = events.try_send(TokenEvent::Failed(e));
                        st.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                self.add_scheduler_time(st, t0);
            }
            SchedulerMsg::Cancel(id) => {
                st.scheduler.cancel(id);
                if st.streams.remove(&id).is_some() {
                    st.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
                }
            }
            SchedulerMsg::StepDone {
                plan,
                outputs,
                model_seconds,
            } => {
                st.in_flight = false;
                let t0 = Instant::now();
                let failed = outputs.is_err();
                // The step lasted as long as its slowest worker.
                let worker = outputs.as_ref().ok().and_then(|o| {
                    o.iter()
                        .map(|o| o.timing)
                        .max_by(|a, b| a.worker_seconds.total_cmp(&b.worker_seconds))
                });
                match outputs {
                    Ok(outputs) => {
                        let events =
                            st.scheduler
                                .complete_timed(plan, outputs, Some(model_seconds));
                        let mut produced: Vec<SeqId> = Vec::new();
                        if !st.suspects.is_empty() {
                            produced = events
                                .iter()
                                .filter(|(_, e)| !matches!(e, TokenEvent::Failed(_)))
                                .map(|&(id, _)| id)
                                .collect();
                            produced.sort_unstable();
                        }
                        self.deliver(st, events);
                        st.scheduler
                            .step_wall_time(st.planned_at.elapsed().as_secs_f64());
                        st.shared
                            .last_progress_ms
                            .store(now_ms(), Ordering::Release);
                        if st.suspects.is_empty() {
                            st.failed_in_a_row = 0;
                        } else {
                            st.clear_suspects(&produced);
                        }
                    }
                    Err(e) => {
                        // Nothing is lost: the step's sequences go back to the queue with
                        // their tokens so far and are recomputed; the next steps single
                        // out a culprit by halves, and only a sequence in every one of
                        // MAX_FAILED_STEPS failures, with no token between, is given up.
                        st.failed_in_a_row += 1;
                        let mut ids: Vec<SeqId> = plan
                            .steps
                            .iter()
                            .flat_map(|(_, step)| step.seqs.iter().map(|s| s.seq_id))
                            .collect();
                        ids.sort_unstable();
                        st.suspect(ids);
                        st.scheduler.abort_step(plan);
                        let failed_in_a_row = st.failed_in_a_row;
                        if failed_in_a_row >= MAX_FAILED_STEPS && !st.suspects.is_empty() {
                            self.give_up(st, &e.to_string());
                        }
                        // After a give-up the count starts again: no pause.
                        let delay = retry_delay(st.failed_in_a_row);
                        tracing::error!(
                            error = %e,
                            failed_in_a_row,
                            retry_in_ms = delay.as_millis() as u64,
                            "step failed; its sequences are requeued"
                        );
                        if !delay.is_zero() {
                            st.retry_pending = true;
                            let me = myself.clone();
                            tokio::spawn(async move {
                                tokio::time::sleep(delay).await;
                                let _ = me.cast(SchedulerMsg::Retry);
                            });
                        }
                    }
                }
                if let Ok(mut s) = st.shared.stats.lock() {
                    s.steps_failed_total += u64::from(failed);
                    s.model_seconds_total += model_seconds;
                    if let Some(w) = worker {
                        s.worker_seconds_total += w.worker_seconds;
                        s.forward_seconds_total += w.forward_seconds;
                        s.worker_queued_seconds_total += w.queued_seconds;
                    }
                    s.step_seconds_total += st.planned_at.elapsed().as_secs_f64();
                }
                self.add_scheduler_time(st, t0);
                self.publish_stats(st);
            }
            SchedulerMsg::WorkerRestarted(i, w, link) => {
                st.workers[i] = w;
                st.links[i] = link;
                st.down[i] = false;
                st.publish_alive();
            }
            SchedulerMsg::Retry => st.retry_pending = false,
            SchedulerMsg::Pause(done) => {
                st.paused = true;
                st.pause_waiters.push(done);
            }
            SchedulerMsg::Resume { reset } => {
                if !reset.is_empty() {
                    tracing::warn!(workers = ?reset, "workers were assigned afresh; their sequences are recomputed");
                    st.scheduler.reset_workers(&reset);
                    self.publish_stats(st);
                }
                st.paused = false;
            }
        }
        self.kick(&myself, st);
        if !st.in_flight {
            self.publish_stats(st);
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        st: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let failed = match &evt {
            SupervisionEvent::ActorFailed(cell, err) => Some((cell.get_id(), err.to_string())),
            SupervisionEvent::ActorTerminated(cell, _, reason) => Some((
                cell.get_id(),
                reason.clone().unwrap_or_else(|| "stopped".into()),
            )),
            _ => None,
        };
        if let Some((id, err)) = failed {
            let Some(i) = st.workers.iter().position(|w| w.get_id() == id) else {
                return Ok(());
            };
            tracing::error!(worker = i, error = %err, "worker failed; restarting it");
            st.down[i] = true;
            st.publish_alive();
            tokio::spawn(restart_worker(myself.clone(), st.factory.clone(), i));
        }
        Ok(())
    }
}

/// Builds worker `i` afresh and hands it to the scheduler; a failed build is retried
/// (0.5 s, doubling up to 30 s) for as long as the scheduler runs, since no step runs
/// while a worker is down.
async fn restart_worker(me: ActorRef<SchedulerMsg>, factory: ExecutorFactory, i: usize) {
    let mut wait = Duration::from_millis(500);
    loop {
        // Building an executor loads weights: do it off the runtime's threads.
        let f = factory.clone();
        let why = match tokio::task::spawn_blocking(move || f(i)).await {
            Ok(Ok(e)) => {
                let link: Arc<dyn WorkerLink> = Arc::from(e);
                match Actor::spawn_linked(None, WorkerActor, link.clone(), me.get_cell()).await {
                    Ok((w, _)) => {
                        let _ = me.cast(SchedulerMsg::WorkerRestarted(i, w, link));
                        return;
                    }
                    Err(e) => e.to_string(),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("panicked: {e}"),
        };
        if stopping(&me) {
            return;
        }
        tracing::error!(worker = i, error = %why, retry_in_ms = wait.as_millis() as u64, "restarting worker failed");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// The fronts' handle on the running engine.
#[derive(Clone)]
pub struct EngineHandle {
    actor: ActorRef<SchedulerMsg>,
    shared: Arc<Shared>,
    model: ModelInfo,
}

impl EngineHandle {
    /// Starts the scheduler and `config.scheduler.n_workers` worker actors.
    pub async fn start(config: EngineConfig, factory: ExecutorFactory) -> Result<Self, ServeError> {
        let sc = &config.scheduler;
        let shared = Arc::new(Shared {
            // Running plus waiting: anything beyond is refused at the door.
            outstanding: AtomicUsize::new(0),
            max_outstanding: sc.max_waiting + sc.max_running * sc.n_workers,
            next_id: AtomicU64::new(1),
            stats: Mutex::new(EngineStats::default()),
            last_progress_ms: AtomicU64::new(now_ms()),
            busy: AtomicBool::new(false),
            started: AtomicBool::new(false),
            workers_alive: AtomicUsize::new(0),
            n_workers: sc.n_workers,
            step_timeout: config.step_timeout,
            lockstep: config.lockstep,
            epoch: AtomicU64::new(0),
            expert_load: Mutex::new(Vec::new()),
            rebalances: Mutex::new(HistogramCounts::new(
                hyserve_telemetry::catalogue::REBALANCE_DURATION_SECONDS.buckets,
            )),
            in_flight: Mutex::new(None),
        });
        let (actor, _) = Actor::spawn(
            None,
            SchedulerActor,
            SchedulerArgs {
                config: config.scheduler.clone(),
                shared: shared.clone(),
                factory,
            },
        )
        .await
        .map_err(|e| ServeError::Internal {
            message: format!("starting the engine: {e}"),
        })?;
        Ok(Self {
            actor,
            shared,
            model: config.model,
        })
    }

    /// The placement epoch the next steps run under (expert parallelism).
    pub fn set_epoch(&self, epoch: u64) {
        self.shared.epoch.store(epoch, Ordering::Release);
    }

    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// A rebalance moved the experts in `seconds` (for the metrics).
    pub fn record_rebalance(&self, seconds: f64) {
        if let Ok(mut r) = self.shared.rebalances.lock() {
            r.observe(seconds);
        }
    }

    /// Stops starting steps and waits until none is in flight (a cluster change that
    /// must not race a step).
    pub async fn pause(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.actor.cast(SchedulerMsg::Pause(tx)).is_ok() {
            let _ = rx.await;
        }
    }

    /// Starts steps again after [`EngineHandle::pause`]; workers `reset` lost their KV
    /// caches, so their sequences are recomputed from their tokens so far.
    pub fn resume(&self, reset: Vec<usize>) {
        let _ = self.actor.cast(SchedulerMsg::Resume { reset });
    }

    /// Rows routed per `[layer][expert]` (flattened) since the last call.
    pub fn take_expert_load(&self) -> Vec<u64> {
        self.shared
            .expert_load
            .lock()
            .map(|mut l| std::mem::take(&mut *l))
            .unwrap_or_default()
    }

    /// Stops the actors (in-flight requests end with their channels closing).
    pub fn stop(&self) {
        self.actor.stop(None);
    }
}

impl Engine for EngineHandle {
    fn submit(&self, request: GenerateRequest) -> Result<TokenStream, ServeError> {
        if request.prompt.is_empty() {
            return Err(ServeError::invalid("prompt", "the prompt is empty"));
        }
        let total = request.prompt.len() + request.max_tokens;
        if total > self.model.max_context {
            return Err(ServeError::invalid(
                "max_tokens",
                format!(
                    "prompt ({} tokens) + max_tokens ({}) exceeds the context length ({})",
                    request.prompt.len(),
                    request.max_tokens,
                    self.model.max_context
                ),
            ));
        }
        if let Some(t) = request
            .prompt
            .iter()
            .find(|&&t| t as usize >= self.model.vocab_size)
        {
            return Err(ServeError::invalid(
                "prompt",
                format!("token id {t} is outside the vocabulary"),
            ));
        }
        let prev = self.shared.outstanding.fetch_add(1, Ordering::AcqRel);
        if prev >= self.shared.max_outstanding {
            self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(ServeError::Overloaded {
                message: format!("{prev} requests are queued or running"),
                retry_after: Duration::from_secs(1),
            });
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let seed = request.sampling.seed.unwrap_or_else(|| {
            // No seed: derive one from the id and the clock (not reproducible by design).
            id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ now_ms()
        });
        let (tx, rx) = mpsc::channel(request.max_tokens + 2);
        let prompt_tokens = request.prompt.len();
        if self
            .actor
            .cast(SchedulerMsg::Submit {
                id,
                request,
                seed,
                events: tx,
            })
            .is_err()
        {
            self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
            return Err(ServeError::Unavailable {
                message: "the engine is stopped".into(),
            });
        }
        let actor = self.actor.clone();
        Ok(TokenStream::new(rx, prompt_tokens, move || {
            let _ = actor.cast(SchedulerMsg::Cancel(id));
        }))
    }

    fn model_info(&self) -> ModelInfo {
        self.model.clone()
    }

    fn health(&self) -> Health {
        let s = &self.shared;
        let live = s.started.load(Ordering::Acquire)
            && s.workers_alive.load(Ordering::Acquire) == s.n_workers;
        // Ready means forward progress: idle, or a step completed recently.
        let stalled = s.busy.load(Ordering::Relaxed)
            && now_ms().saturating_sub(s.last_progress_ms.load(Ordering::Acquire))
                > s.step_timeout.as_millis() as u64;
        Health {
            live,
            ready: live && !stalled,
        }
    }

    fn stats(&self) -> EngineStats {
        let s = &self.shared;
        let mut stats = s.stats.lock().map(|s| s.clone()).unwrap_or_default();
        stats.workers_alive = s.workers_alive.load(Ordering::Acquire);
        stats.workers_expected = s.n_workers;
        if s.lockstep {
            stats.epoch = s.epoch.load(Ordering::Acquire);
        }
        if let Ok(r) = s.rebalances.lock() {
            stats.rebalances_total = r.count();
            stats.rebalance_seconds = r.clone();
        }
        stats
    }
}
