"""The leader's side of delivery: which decisions to propose next.

``Planning`` is mixed into ``BrokerState``. Its methods read the applied state and
return ops (assign, requeue, release, expire) for the leader to propose; they
change nothing replicated. The only memory they keep is which ops are planned and
not yet applied (``planned``, ``planned_slots``), so one event is not proposed
twice; that memory is dropped when leadership changes.

Every decision is checked again when its op is applied (``BrokerState._op_*``),
so a plan made on a stale view is harmless: it comes back ``STALE``.
"""

from __future__ import annotations

import heapq

from raft import schema

from raft.schema import DEFERRED


class Planning:
    def plan(self, now_ms: int, term: int, ack_timeout_ms: int,
             ops_max: int) -> list[dict]:
        """Delivery decisions for the leader to propose; pure over applied state."""
        assert ops_max > 0

        ops = self._plan_timeouts(now_ms, term, ops_max)
        ops += self._plan_releases(now_ms, ops_max - len(ops))
        for app in list(self.dirty_apps):
            if len(ops) >= ops_max:
                break
            if self._plan_app(app, now_ms, term, ack_timeout_ms, ops, ops_max):
                self.dirty_apps.discard(app)
        for op in ops:
            if op["op"] == "assign":
                self.planned[(op["p"], op["off"])] = now_ms
                slot = (op["sid"], op["pattern"], op.get("slot", 0))
                self.planned_slots[slot] = now_ms
        return ops

    def _plan_timeouts(self, now_ms: int, term: int, ops_max: int) -> list[dict]:
        ops = []
        for key in self.inflight.values():
            ev = self.events[key]
            if ev.deadline_ms <= now_ms and len(ops) < ops_max:
                ops.append({"op": "requeue", "p": ev.p, "off": ev.off,
                            "attempt": ev.attempts, "term": term, "ts": now_ms,
                            "reason": "ack timeout"})
        return ops

    def _plan_releases(self, now_ms: int, ops_max: int) -> list[dict]:
        ops = []
        while self.deferred and len(ops) < ops_max:
            due_ms, p, off = self.deferred[0]
            ev = self.events.get((p, off))
            if ev is None or ev.state != DEFERRED or ev.due_ms != due_ms:
                heapq.heappop(self.deferred)  # stale: already released or moved
                continue
            if due_ms > now_ms or (p, off) in self.planned:
                break
            ops.append({"op": "release", "p": p, "off": off, "ts": now_ms})
            self.planned[(p, off)] = now_ms
        return ops

    def _plan_app(self, app: str, now_ms: int, term: int, ack_timeout_ms: int,
                  ops: list[dict], ops_max: int) -> bool:
        """Fill free slots of one app; True when nothing is left to plan there."""
        queues = self.queues.get(app)
        if not queues:
            return True
        sids = self.app_sessions.get(app, [])
        # Rotate so that competing consumers take turns.
        if sids:
            sids.append(sids.pop(0))

        for sid in list(sids):
            session = self.sessions[sid]
            for pattern, paused in session.subs.items():
                if paused:
                    continue
                free = [slot for slot in range(session.windows.get(pattern, 1))
                        if (sid, pattern, slot) not in self.inflight
                        and (sid, pattern, slot) not in self.planned_slots]
                if not free:
                    continue
                room = ops_max - len(ops)
                if room <= 0:
                    return False
                deadline_ms = now_ms + session.ack_timeouts_ms.get(pattern,
                                                                   ack_timeout_ms)
                for slot, ev in zip(free[:room], self._next_pending(
                        app, queues, pattern, min(len(free), room))):
                    op = {"op": "assign", "p": ev.p, "off": ev.off, "sid": sid,
                          "pattern": pattern, "term": term, "ts": now_ms,
                          "deadline_ms": deadline_ms}
                    if slot:
                        op["slot"] = slot
                    ops.append(op)
                    self.planned[(ev.p, ev.off)] = now_ms
                if len(free) > room:
                    return False  # slots left for the next round
        return True

    def _next_pending(self, app: str, queues: dict, pattern: str, count: int) -> list:
        """Up to ``count`` pending, unplanned events of the app that ``pattern``
        matches, smallest rank first."""
        found = []
        for name, queue in queues.items():
            if not schema.matches(pattern, name) or queue.pending <= 0:
                continue
            found += queue.heads(count, self.events, self.planned, self.reader,
                                 self._make_event)
        if len(found) > 1:
            found.sort(key=lambda ev: ev.rank())
        return found[:count]

    def plan_expiry(self, now_ms: int, term: int, retention_ms: int,
                    ops_max: int) -> list[dict]:
        """Leader: expire queue heads older than the retention (oldest first per
        queue in commit order; a newer high-priority head defers the check)."""
        ops = []
        for queues in self.queues.values():
            for queue in queues.values():
                if len(ops) >= ops_max:
                    return ops
                if queue.pending <= 0:
                    continue
                ev = queue.head(self.events, self.planned, self.reader,
                                self._make_event)
                if ev is not None and ev.born_ms + retention_ms <= now_ms:
                    self.planned[(ev.p, ev.off)] = now_ms
                    ops.append({"op": "expire", "p": ev.p, "off": ev.off,
                                "retention_ms": retention_ms, "term": term,
                                "ts": now_ms})
        return ops

    def plan_key_expiry(self, now_ms: int, ops_max: int) -> list[dict]:
        """Leader: a ``key_expire`` for each key whose expiry has passed, once.

        The op carries the leader's time, and apply checks the expiry against
        it: a replica never reads its own clock for this."""
        assert ops_max > 0

        ops = []
        for app, expires_ms in self.key_expiries.items():
            if len(ops) >= ops_max:
                break
            if expires_ms <= now_ms and ("key", app) not in self.planned:
                self.planned[("key", app)] = now_ms
                ops.append({"op": "key_expire", "app_id": app, "ts": now_ms})
        return ops

    def forget_plans(self) -> None:
        """Called when this node stops leading: its pending plans mean nothing."""
        self.planned.clear()
        self.planned_slots.clear()
        self.dirty_apps = set(self.apps)

    def expire_plans(self, now_ms: int, age_ms_max: int) -> None:
        """Drop plans whose assign never came back (a lost proposal)."""
        for table in (self.planned, self.planned_slots):
            for key, at in list(table.items()):
                if now_ms - at > age_ms_max:
                    del table[key]
                    self.dirty_apps.update(self.apps)

    def nodes_with_sessions(self) -> set[str]:
        return {s.node for s in self.sessions.values()}

