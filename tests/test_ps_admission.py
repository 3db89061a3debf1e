"""When a parameter server applies a push and when it answers (harness/ps/server.py), driven in
one process through a scripted fake communicator: no MPI.

* async: every push is applied at once and answered at once.
* ssp: a worker more than ``ps_staleness`` clocks ahead of the slowest active worker gets its
  answer only once the slowest catches up (and then parameters that include the slow push).
* bsp: the pushes of one clock from every active worker are averaged and applied once, then
  every worker is answered; a worker that finished no longer holds the others back.
"""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace

import numpy as np
import pytest

from harness.config import RunConfig
from harness.ps import protocol as P
from harness.ps.server import Server

N = 6                       # parameters in the shard
LR = 0.5
W1, W2 = 1, 2               # worker ranks (rank 0 serves)


class FakeComm:
    """Hands the server the scripted messages in order and records what it sends, with the
    number of messages it had received by then."""

    def __init__(self, script: list[tuple[int, int, np.ndarray]]) -> None:
        self.script = deque(script)
        self.received = 0
        self.sent: list[tuple[int, int, np.ndarray, int]] = []

    def Get_rank(self) -> int:
        return 0

    def Recv(self, buf, source=-1, tag=None, status=None) -> None:
        src, t, data = self.script.popleft()
        assert t == tag and source in (-1, src), f"server waits for {tag} from {source}, " \
            f"the script has {t} from {src}"
        buf[...] = data
        if status is not None:
            status.source = src
        self.received += 1

    def Send(self, buf, dest, tag) -> None:
        self.sent.append((dest, tag, np.array(buf), self.received))

    def Abort(self, code) -> None:
        raise SystemExit(code)


class FakeStatus:
    source = -1

    def Get_source(self) -> int:
        return self.source


FakeMPI = SimpleNamespace(ANY_SOURCE=-1, Status=FakeStatus)


def pull(rank):
    return [(rank, P.HDR, P.header(P.PULL))]


def push(rank, clock, grad, version_used=0):
    return [(rank, P.HDR, P.header(P.PUSH, clock=clock, version_used=version_used, samples=8)),
            (rank, P.GRAD, np.full(N, grad, np.float32))]


def done(rank):
    return [(rank, P.HDR, P.header(P.DONE))]


def make_server(tmp_path, script, **cfg) -> tuple[Server, FakeComm, np.ndarray]:
    """One server (the whole vector) for workers 1 and 2, with the script to serve."""
    config = RunConfig(mode="async", momentum=0.0, weight_decay=0.0, **cfg)
    comm = FakeComm([m for part in script for m in part])
    plan = SimpleNamespace(shards=[(0, 0, N)], worker_ranks=[W1, W2], world_size=3, params=N,
                           run_dir=tmp_path, total_steps=100, schedule=lambda clock: LR,
                           ckpt_dir=tmp_path / "ckpt", ckpt_every=0)
    ctx = SimpleNamespace(cfg=config, stop=SimpleNamespace(requested=False), ckpt_meta={},
                          on_eval=lambda *a: None)
    log = SimpleNamespace(info=print, warning=print, error=print)
    watchdog = SimpleNamespace(tick=lambda *a, **k: None, describe=None)
    start = np.zeros(N, np.float32)
    server = Server(comm, FakeMPI, ctx, plan, 0, start.copy(), None, watchdog, log)
    return server, comm, start


def serve(tmp_path, script, **cfg) -> tuple[Server, FakeComm, np.ndarray]:
    """Serve the script to its end with one server (the whole vector) and workers 1 and 2."""
    server, comm, start = make_server(tmp_path, script, **cfg)
    server.serve()
    assert not comm.script, "the server stopped before the script's end"
    return server, comm, start


def test_a_joined_worker_that_is_lost_is_never_answered_and_frees_its_slot(tmp_path):
    """ssp holds back a joined worker (id 3, in failed worker 2's slot); its heartbeat stops:
    it leaves the hold list and nothing more is sent to it (its link is gone), and its slot is
    free for the next joiner from its clock."""
    from harness.ps.server import LEFT, WorkerState

    server, comm, _ = make_server(tmp_path, [], ps_consistency="ssp", ps_staleness=0)
    joined = FakeComm([])
    server.workers[W2].state = LEFT
    server.workers[3] = WorkerState(3, clock=5, slot=W2)
    server.links[3], server.request_of[3] = (joined, 0), 1
    server.workers[W1].clock = 2
    server.deferred = [3]                         # 3 is ahead of the slowest (worker 1)
    assert server._free_slot() == -1              # slot 2 is taken by the joined worker
    server._lose(3)
    server.workers[W1].clock = 5
    server._release()                             # would answer 3 now, were it still there
    assert comm.sent == [] and joined.sent == [] and server.deferred == []
    assert server.workers[3].state == LEFT and "stopped answering" in \
        server.failed_workers()["3"]
    assert server._free_slot() == W2 and server.clocks()[str(W2)] == 5


def replies(comm: FakeComm) -> list[tuple[int, int, int, np.ndarray]]:
    """(worker, messages received before the answer, server version in it, parameters)."""
    out = []
    sent = [s for s in comm.sent if s[1] in (P.PARAMS_HDR, P.PARAMS)]
    for (dest, _, hdr, after), (dest2, tag, params, _) in zip(sent[::2], sent[1::2]):
        assert dest == dest2 and tag == P.PARAMS
        out.append((dest, after, int(hdr[P.R_VERSION]), params))
    return out


# worker 1 pushes clocks 0 and 1 before worker 2 pushes its clock 0
RUN_AHEAD = [pull(W1), pull(W2), push(W1, 0, 1.0), push(W1, 1, 2.0, version_used=1),
             push(W2, 0, 4.0), done(W1), done(W2)]
MESSAGES_BEFORE_W2_PUSH = 1 + 1 + 2 + 2          # header and gradient of each push


@pytest.mark.parametrize("consistency,staleness,waits", [("async", 1, False),
                                                         ("ssp", 1, True), ("ssp", 2, False)])
def test_a_worker_too_far_ahead_waits_for_the_slowest(tmp_path, consistency, staleness, waits):
    server, comm, start = serve(tmp_path, RUN_AHEAD, ps_consistency=consistency,
                                ps_staleness=staleness)
    got = replies(comm)
    assert [(w, after) for w, after, _, _ in got[:2]] == [(W1, 1), (W2, 2)]      # the pulls
    w1_clock0, w1_clock1 = [r for r in got[2:] if r[0] == W1]
    (w2_clock0,) = [r for r in got[2:] if r[0] == W2]
    # every push is applied when it arrives: versions 1, 2, 3
    assert w1_clock0[1:3] == (4, 1) and w2_clock0[1:3] == (MESSAGES_BEFORE_W2_PUSH + 2, 3)
    if waits:
        # worker 1 at clock 2 is 2 ahead of worker 2 (clock 0) > 1: answered only after
        # worker 2's push, with parameters that include it
        assert w1_clock1[1:3] == (MESSAGES_BEFORE_W2_PUSH + 2, 3)
        np.testing.assert_array_equal(w1_clock1[3], start - LR * (1.0 + 2.0 + 4.0))
    else:
        assert w1_clock1[1:3] == (MESSAGES_BEFORE_W2_PUSH, 2)
        np.testing.assert_array_equal(w1_clock1[3], start - LR * (1.0 + 2.0))
    # how far ahead of the slowest a worker went on with fresh parameters: never past the bound
    assert server.max_lead == (staleness if waits else 2)
    assert server.clocks() == {str(W1): 2, str(W2): 1}
    np.testing.assert_array_equal(server.params, start - LR * (1.0 + 2.0 + 4.0))


def test_bsp_applies_one_clock_of_every_worker_at_once(tmp_path):
    script = [pull(W1), pull(W2), push(W1, 0, 1.0), push(W2, 0, 3.0),
              push(W2, 1, 5.0, version_used=1), done(W1), done(W2)]
    server, comm, start = serve(tmp_path, script, ps_consistency="bsp")
    got = replies(comm)
    assert [(w, after, v) for w, after, v, _ in got] == [
        (W1, 1, 0), (W2, 2, 0),
        # nothing for worker 1's push alone; both answered once worker 2's push of the same
        # clock came, with the average of the two applied as one update
        (W1, 6, 1), (W2, 6, 1),
        # worker 2's clock 1 waits for worker 1's, until worker 1 says it is done
        (W2, 9, 2)]
    after_clock0 = start - LR * (1.0 + 3.0) / 2
    np.testing.assert_array_equal(got[2][3], after_clock0)
    np.testing.assert_array_equal(got[3][3], after_clock0)
    np.testing.assert_array_equal(got[4][3], after_clock0 - LR * 5.0)
    assert server.version == 2 and server.clocks() == {str(W1): 1, str(W2): 2}
    assert dict(server.staleness) == {0: 3}                    # every push in its own clock


def leave(rank, reason: str):
    text = np.frombuffer(reason.encode(), np.uint8)
    return [(rank, P.HDR, P.header(P.LEAVE, aux=len(text))), (rank, P.REASON, text)]


def test_ssp_releases_a_waiting_worker_when_the_slowest_fails(tmp_path):
    script = [pull(W1), pull(W2), push(W1, 0, 1.0), push(W1, 1, 2.0, version_used=1),
              leave(W2, "worker 2 raised"), done(W1)]
    server, comm, start = serve(tmp_path, script, ps_consistency="ssp", ps_staleness=1,
                                ps_on_worker_failure="continue")
    got = replies(comm)
    # worker 1's clock-1 push waits for worker 2, which fails instead: once worker 2 has left,
    # worker 1 is the slowest active worker and gets its answer
    assert [(w, after, v) for w, after, v, _ in got] == [
        (W1, 1, 0), (W2, 2, 0), (W1, 4, 1), (W1, MESSAGES_BEFORE_W2_PUSH + 2, 2)]
    np.testing.assert_array_equal(got[-1][3], start - LR * (1.0 + 2.0))
    assert server.failed_workers() == {str(W2): "worker 2 raised"}
