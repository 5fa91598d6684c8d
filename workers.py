"""How a run's samples are decoded in worker processes, and how a run stops.

`run_jobs` hands the samples to forked worker processes (they share the loaded weights), one sample each
at a time, and yields each sample's rows in the samples' order, so that evaluate.py saves every sample as
it ends. A run stops on Ctrl-C, SIGTERM or SIGHUP (`Stop`: exit code 130, 143 or 129), on a worker process
that dies mid-sample (`WorkerLost`: the OOM killer, after the samples before its own are saved), or on a
full disk; each says in one line how many samples are saved and that the same command resumes. Long runs
show a progress bar (`progress`).
"""

import contextlib
import errno
import multiprocessing
import multiprocessing.connection
import signal
import sys
import threading

import torch
from tqdm import tqdm

from experiment import DECODE_THREADS, evaluate_sample
from results import read_rows

# ============================================================================ stop signals


class Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job scheduler, a closed terminal): stops a run as Ctrl-C does, with the
    signal's exit code (128 + its number: 143, 129)."""

    def __init__(self, signum):
        self.signal = signal.Signals(signum).name
        self.code = 128 + signum
        super().__init__(self.signal)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _stop(signum, frame):
    for s in STOP_SIGNALS:  # once: a second signal does not break the clean-up of the first
        signal.signal(s, signal.SIG_IGN)
    raise Stop(signum)


def stop_code(stop):
    """The exit code of a run stopped by `stop` (a KeyboardInterrupt): 130 for Ctrl-C, 128 + signal."""
    return getattr(stop, "code", 130)


def stopped_by(stop):
    """'' for Ctrl-C, ' (SIGTERM)' or ' (SIGHUP)' for a Stop: what the interrupted line says."""
    return f" ({stop.signal})" if isinstance(stop, Stop) else ""


@contextlib.contextmanager
def stop_signals():
    """While the block (or the function it decorates) runs, SIGTERM and SIGHUP raise Stop, as Ctrl-C raises
    KeyboardInterrupt (only in the main thread, where signal handlers live); the handlers before it are
    restored after it."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, _stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ============================================================================ worker processes


class WorkerLost(RuntimeError):
    """A worker process ended without sending its sample's rows (the OOM killer, a kill -9)."""


def _serve(conn, inherited, model, tok, calibration):
    """A worker process (run_jobs): decode each job the parent sends on `conn`, send back its rows (or
    its exception), until the parent closes the pipe. Ctrl-C reaches every process of the terminal:
    a worker ignores it and the parent ends it. SIGTERM and SIGHUP end it at once (not the parent's
    handler, Stop): mid-sample, a worker has nothing to save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_DFL)
    for c in inherited:  # the parent's ends of the earlier workers' pipes: theirs to close, not ours
        c.close()
    torch.set_num_threads(DECODE_THREADS)
    while True:
        try:
            job = conn.recv()
        except EOFError:  # the run is over, or the parent is gone
            return
        try:
            reply = (True, evaluate_sample(model, tok, *job, calibration=calibration))
        except Exception as err:  # raised again in the parent, as if the sample ran there
            reply = (False, err)
        try:
            conn.send(reply)
        except BrokenPipeError:  # the parent is gone (kill -9): nobody wants the rows
            return


def run_jobs(model, tok, jobs, workers, calibration=None):
    """Yield each job's rows in order. Several CPU workers: one sample per process.

    Every sample is computed with DECODE_THREADS torch threads, in a worker or in this process, so its
    numbers do not depend on the worker count (torch's CPU kernels split a reduction differently with
    another thread count). A decode step is a few thousand small torch calls, bound by Python
    overhead and memory traffic rather than arithmetic, so a second core does more as a second process
    on the next sample than as a second thread in the same one (measured: 73 s per sample with 1
    thread, 75 s with 2).

    Each worker is a forked process (it shares the loaded weights copy-on-write) with a pipe of its own
    and one job at a time. Not multiprocessing.Pool: its workers share one job queue behind a lock,
    and a worker killed while it waits on that queue (SIGHUP from a closed terminal reaches the whole
    process group) keeps the lock forever, so the pool's own shutdown then waits forever. Here a
    worker that ends at any point only closes its own pipe: the parent raises WorkerLost, or, when
    the run is stopped, ends the other workers and returns.
    """
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(DECODE_THREADS)
        try:
            for job in jobs:
                yield evaluate_sample(model, tok, *job, calibration=calibration)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = multiprocessing.get_context("fork")
    pool = {}  # the parent's end of each worker's pipe -> its process
    try:
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            args = (theirs, list(pool), model, tok, calibration)
            worker = ctx.Process(target=_serve, args=args, daemon=True)
            worker.start()
            theirs.close()  # the worker holds the only copy of its end: its pipe ends when it does
            pool[mine] = worker
        yield from _in_order(pool, jobs)
    finally:
        for conn, worker in pool.items():
            worker.terminate()  # SIGTERM; one that has already ended is left as it is
            worker.join()
            conn.close()


def _in_order(pool, jobs):
    """Hand each idle worker of `pool` the next job, and yield the jobs' rows in the jobs' order (a
    sample that finishes early waits in `ahead` for the ones before it). A sample that fails (its
    exception, or its worker lost) is raised in its turn, so the samples before it are still yielded
    (and saved); no job is handed out after it. A worker ended by SIGTERM or SIGHUP stops the run at
    once, as the parent's own handler does (Stop)."""
    todo = iter(enumerate(jobs))
    busy = {}  # conn -> the index of the job its worker decodes
    ahead = {}  # job index -> (True, its rows) or (False, the exception to raise), before its turn
    following = 0  # the index of the next job to yield

    def hand_out(conn):
        i, job = next(todo, (None, None))
        if job is not None:
            busy[conn] = i
            with contextlib.suppress(BrokenPipeError):  # a worker that has ended: wait() below says so
                conn.send(job)

    for conn in pool:
        hand_out(conn)
    while busy:
        for conn in multiprocessing.connection.wait(list(busy)):
            i = busy.pop(conn)
            try:
                ahead[i] = conn.recv()  # (True, the sample's rows) or (False, its exception)
            except (EOFError, OSError):  # the worker ended mid-sample, or mid-reply
                worker = pool[conn]
                worker.join()
                if -worker.exitcode in STOP_SIGNALS:
                    raise Stop(-worker.exitcode) from None
                lost = f"the worker process decoding sample {jobs[i][0]['id']} ended"
                ahead[i] = (False, WorkerLost(f"{lost} ({exit_reason(worker.exitcode)}) without its rows"))
            if all(ok for ok, _ in ahead.values()):
                hand_out(conn)
        while following in ahead:
            ok, reply = ahead.pop(following)
            if not ok:
                raise reply
            yield reply
            following += 1


def exit_reason(code):
    """How a process ended, from its exit code: 'killed by SIGKILL' for -9, else 'exit code N'."""
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


# ============================================================================ what a stopped run says


def saved_samples(out, mine, policies):
    """How many of the samples `mine` have a saved row for every configuration of `policies`."""
    keys = {p.key() for p in policies}
    rows = read_rows(out)
    done = {s["id"] for s in mine} & {r["sample"] for r in rows}
    return sum(keys <= {r["key"] for r in rows if r["sample"] == i} for i in done)


def saved_line(out, mine, policies):
    """'N of M samples are saved in OUT': what the one line of a run that failed midway says is kept."""
    return f"{saved_samples(out, mine, policies)} of {len(mine)} samples are saved in {out}"


def interrupted(out, mine, policies, before, stop):
    """Ctrl-C, SIGTERM, SIGHUP: what is saved (samples.jsonl is rewritten atomically after every
    sample) and how to go on; returns the exit code (stop_code)."""
    saved = saved_samples(out, mine, policies)
    if sys.stderr.isatty():
        print(file=sys.stderr)  # end the progress line
    print(
        f"interrupted{stopped_by(stop)}: {saved} of {len(mine)} samples are saved in {out} "
        f"({saved - before} by this run); run the same command again to resume",
        file=sys.stderr,
    )
    return stop_code(stop)


def not_written(err, saved):
    """The one line of a write that failed (a full disk): which file, why, what is saved, what to do."""
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    return f"cannot write {err.filename} ({err.strerror}): {saved}; {fix}, then run the same command again"


# ============================================================================ progress


def progress(done, total, what="samples"):
    """A tqdm bar on stderr: samples done, elapsed time and the ETA from this run's pace (samples done
    before this run, `done`, do not count towards the pace). On a terminal it redraws one line; in a
    log file (stderr not a terminal) every sample gets a line of its own (`_Lines`)."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit=what[:-1],
        desc=what,
        file=sys.stderr if tty else _Lines(sys.stderr),
        mininterval=0.1 if tty else 0,
        dynamic_ncols=tty,
        ncols=None if tty else 80,
        leave=tty,  # a log already has the last line; a terminal keeps the bar
    )


class _Lines:
    """A file for tqdm that turns each redraw of the bar ('\\r' + text) into a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.strip("\r\n").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()
