"""Linearizability checking of key-value histories recorded by clients (the fault tests' top check).
It owns the model of one key (a register with put/get/remove), the Wing-Gong search with Lowe's
memoization (as Porcupine does it, plus the prunings explained in _check_key) and the History
recorder. It must never pass a violation nor report one that is not: where the record leaves a
choice open (equal timestamps, an op that never answered) it takes the reading that allows more
orders, so a reported violation is a real one. tests/unit/test_linearizability.py checks every
verdict against a brute-force oracle on small random histories.

Cost: linear on ordinary histories (thousands of ops per key with a dozen or more clients take
well under a second); the worst case stays exponential in how many ops overlap in time.

Rules the search relies on:
- P-compositionality: a history is linearizable iff each key's sub-history is, so every key is
  searched alone (and small searches stay small).
- An op with complete=None may have taken effect at any moment after its invoke, or never. Its
  output is unknown. An unanswered get constrains nothing and is dropped; an unanswered put or
  remove is always acceptable to the model, so the search succeeds as soon as every *answered* op
  is linearized: the unanswered ones left over are "never took effect" (or "took effect last").
- Times only order ops when one's complete is strictly before another's invoke; equal times
  count as overlapping.
- SIZE and SCAN span keys, so they cannot be checked per key; they are ignored (counted in
  CheckResult.ignored). Compare SCAN output across replicas instead.
"""
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple, Union

KV_OPS = ("put", "get", "remove")
IGNORED_OPS = ("size", "scan")

_PUT, _GET, _REMOVE = 0, 1, 2
_KIND = {"put": _PUT, "get": _GET, "remove": _REMOVE}
_ABSENT = 0  # the interned state of a key that holds no value
_DETAIL_OPS = 5  # how many of the last linearized ops a failure report shows


@dataclass(frozen=True, kw_only=True)
class Operation:
    """One client call. output: get -> the value read, or None for NOT_FOUND; remove -> True if the
    key existed; put -> None. complete=None: no answer was ever seen (output is then ignored)."""
    client: Hashable
    op: str
    key: Hashable
    invoke: float
    complete: Optional[float] = None
    value: Any = None
    output: Any = None

    def describe(self) -> str:
        if self.op == "put":
            call = f"put({self.key!r}, {self.value!r})"
        else:
            call = f"{self.op}({self.key!r})"
        if self.complete is None:
            return f"{call} -> ? by client {self.client!r} [{self.invoke}, never answered]"
        result = "" if self.op == "put" else f" -> {self.output!r}"
        return f"{call}{result} by client {self.client!r} [{self.invoke}, {self.complete}]"


@dataclass(frozen=True)
class CheckResult:
    """ok is the verdict; on failure the other fields describe the first failing key at the
    deepest point the search reached: `blocked` is the answered op that could not be placed next,
    `state` the key's value there (None = absent), `prefix_tail` the last ops placed before it,
    `concurrent` the ops overlapping `blocked` in time. `ops` is all of those, by invoke time."""
    ok: bool
    key: Any = None
    blocked: Optional[Operation] = None
    state: Any = None
    prefix_tail: Tuple[Operation, ...] = ()
    concurrent: Tuple[Operation, ...] = ()
    failing_keys: Tuple[Any, ...] = ()
    checked: int = 0
    ignored: int = 0
    explanation: str = "linearizable"
    ops: Tuple[Operation, ...] = field(init=False)

    def __post_init__(self) -> None:
        seen: Dict[int, Operation] = {}
        for op in ((self.blocked,) if self.blocked else ()) + self.prefix_tail + self.concurrent:
            seen.setdefault(id(op), op)
        object.__setattr__(self, "ops", tuple(sorted(seen.values(), key=lambda op: op.invoke)))

    def __bool__(self) -> bool:
        return self.ok

    def __str__(self) -> str:
        return self.explanation


OperationLike = Union[Operation, Mapping[str, Any]]
_FIELDS = frozenset(f.name for f in fields(Operation))


def _as_operation(item: OperationLike) -> Operation:
    if isinstance(item, Operation):
        op = item
    else:
        unknown = set(item) - _FIELDS
        if unknown:
            raise ValueError(f"unknown operation fields {sorted(unknown)} in {dict(item)!r}")
        op = Operation(**item)
    if op.op not in KV_OPS and op.op not in IGNORED_OPS:
        raise ValueError(f"unknown op {op.op!r}; expected one of {KV_OPS + IGNORED_OPS}")
    if op.complete is not None and op.complete < op.invoke:
        raise ValueError(f"operation completes before it is invoked: {op.describe()}")
    if op.op == "put" and op.value is None:
        raise ValueError(f"a put needs a value: {op.describe()}")
    if op.op == "remove" and op.complete is not None and not isinstance(op.output, bool):
        raise ValueError(f"a remove's output must be True or False: {op.describe()}")
    return op


def check_operations(operations: Iterable[OperationLike], stop_at_first: bool = True) -> CheckResult:
    """Check a key-value history. Accepts Operation objects or dicts with the same fields.
    stop_at_first=False searches every key so failing_keys lists them all."""
    by_key: Dict[Any, List[Operation]] = {}  # insertion order = first appearance: stable reports
    ignored = 0
    checked = 0
    for item in operations:
        op = _as_operation(item)
        if op.op in IGNORED_OPS:
            ignored += 1
            continue
        checked += 1
        by_key.setdefault(op.key, []).append(op)
    failures: List[Tuple[Any, dict]] = []
    for key, key_ops in by_key.items():
        failure = _check_key(key_ops)
        if failure is not None:
            failures.append((key, failure))
            if stop_at_first:
                break
    if not failures:
        return CheckResult(ok=True, checked=checked, ignored=ignored)
    key, failure = failures[0]
    return CheckResult(ok=False, key=key, failing_keys=tuple(k for k, _ in failures),
                       checked=checked, ignored=ignored, **failure)


def _check_key(ops: List[Operation]) -> Optional[dict]:
    """The search for one key. Returns None if linearizable, else the fields of a failure."""
    # An unanswered get neither changes the state nor tells us anything.
    ops = sorted((op for op in ops if not (op.op == "get" and op.complete is None)),
                 key=lambda op: op.invoke)
    n = len(ops)
    if n == 0:
        return None

    # Values become small ints so states hash and compare cheaply whatever their size:
    # 0 = absent, 1.. = values, and one more slot, PRESENT, for the counters below.
    value_ids: Dict[Any, int] = {}
    values: List[Any] = [None]

    def intern(value: Any) -> int:
        if value is None:
            return _ABSENT
        vid = value_ids.get(value)
        if vid is None:
            vid = value_ids[value] = len(values)
            values.append(value)
        return vid

    kind = [_KIND[op.op] for op in ops]
    answered = [op.complete is not None for op in ops]
    arg = [intern(op.value) if op.op == "put" else _ABSENT for op in ops]
    expected = [0] * n  # get: the value id read; answered remove: 1 if it existed, else 0
    for i, op in enumerate(ops):
        if answered[i]:
            if kind[i] == _GET:
                expected[i] = intern(op.output)
            elif kind[i] == _REMOVE:
                expected[i] = 1 if op.output else 0
    present = len(values)

    # Starvation pruning. Each unplaced answered op that reads the state *needs* a value (a get:
    # what it read; a remove -> False: absent; a remove -> True: PRESENT, any value), and each
    # unplaced write can *supply* one (a put: its value and PRESENT; any remove but one that
    # reported False: absent). If a needed value is not the current state and no unplaced op can
    # supply it, no continuation can succeed: the node is dead at once, instead of after the
    # search has tried every interleaving up to the reader's return. This is what keeps a wrong
    # guess about the order of concurrent puts cheap.
    need = [0] * (present + 1)
    supply = [0] * (present + 1)
    needs: List[Tuple[int, ...]] = []
    supplies: List[Tuple[int, ...]] = []
    for i in range(n):
        if kind[i] == _PUT:
            needs.append(())
            supplies.append((arg[i], present))
        elif kind[i] == _GET:
            needs.append((expected[i],))
            supplies.append(())
        elif answered[i] and expected[i] == 0:
            needs.append((_ABSENT,))
            supplies.append(())
        else:
            needs.append((present,) if answered[i] else ())
            supplies.append((_ABSENT,))
        for v in needs[i]:
            need[v] += 1
        for v in supplies[i]:
            supply[v] += 1
    starved = {v for v in range(present + 1) if need[v] and not supply[v]}

    def take(i: int) -> None:
        for v in needs[i]:
            need[v] -= 1
            if not need[v]:
                starved.discard(v)
        for v in supplies[i]:
            supply[v] -= 1
            if not supply[v] and need[v]:
                starved.add(v)

    def give_back(i: int) -> None:
        for v in needs[i]:
            need[v] += 1
            if not supply[v]:
                starved.add(v)
        for v in supplies[i]:
            supply[v] += 1
            starved.discard(v)

    def starving(state: int) -> int:
        """A needed value that the state is not and nothing left can supply, or -1."""
        for v in starved:
            if v == present:
                if state == _ABSENT:
                    return v
            elif v != state:
                return v
        return -1

    # Events sorted by time; on equal times calls come first, so touching intervals overlap.
    events = [(op.invoke, 0, i) for i, op in enumerate(ops)]
    events += [(op.complete, 1, i) for i, op in enumerate(ops) if op.complete is not None]
    events.sort(key=lambda event: (event[0], event[1], event[2]))

    # A doubly linked list of events (0 = head sentinel) that ops are lifted out of as they are
    # linearized and put back on backtracking, in strict LIFO order (dancing links).
    size = len(events) + 1
    nxt = list(range(1, size + 1))
    prv = list(range(-1, size - 1))
    nxt[size - 1] = 0  # circular through the head sentinel
    prv[0] = size - 1
    is_return = [False] * size
    op_of = [0] * size
    return_of = [0] * size  # call event -> its return event, 0 if the op never answered
    call_event = [0] * n
    is_return[0] = True  # the head sentinel stops every walk (see open_node)
    for position, (_, event_kind, i) in enumerate(events, start=1):
        op_of[position] = i
        if event_kind == 0:
            call_event[i] = position
        else:
            is_return[position] = True
            return_of[call_event[i]] = position

    def lift(i: int) -> None:
        event = call_event[i]
        nxt[prv[event]] = nxt[event]
        prv[nxt[event]] = prv[event]
        ret = return_of[event]
        if ret:
            nxt[prv[ret]] = nxt[ret]
            prv[nxt[ret]] = prv[ret]

    def unlift(i: int) -> None:
        event = call_event[i]
        ret = return_of[event]
        if ret:
            prv[nxt[ret]] = ret
            nxt[prv[ret]] = ret
        prv[nxt[event]] = event
        nxt[prv[event]] = event

    bits = [1 << i for i in range(n)]
    observes = [kind[i] == _GET or (kind[i] == _REMOVE and answered[i]) for i in range(n)]
    # Within a node, candidates are tried in order of their interval's midpoint, the best guess
    # of where the op really took effect: on a linearizable history the first guess is usually
    # right. Unanswered ops go last.
    try_order = [(op.invoke + op.complete) / 2 if op.complete is not None else float("inf")
                 for op in ops]
    unplaced_answered = sum(answered)
    state = _ABSENT
    placed = 0  # bitmask of answered ops linearized so far
    spent = 0  # bitmask of unanswered ops linearized so far
    # An unanswered op is only worth placing right before an op that observes the state (a get or
    # an answered remove): followed by a write or by nothing, its effect is overwritten unseen and
    # the same order without it is just as valid. `must_observe` enforces that canonical form.
    must_observe = False
    # Memo: (placed, state, must_observe) -> the `spent` sets already explored from there. Having
    # spent more unanswered ops only removes options, so a superset of an explored (and, since we
    # are still searching, failed) set fails too.
    explored: Dict[Tuple[int, int, bool], List[int]] = {}

    def is_new(memo: Tuple[int, int, bool], new_spent: int) -> bool:
        spent_sets = explored.get(memo)
        if spent_sets is None:
            explored[memo] = [new_spent]
            return True
        if any(earlier & ~new_spent == 0 for earlier in spent_sets):
            return False
        spent_sets.append(new_spent)
        return True

    def open_node() -> List:
        """[candidate ops, the op whose return is next, position]. The candidates are the ops
        invoked before the first pending return: only they may go next."""
        candidates = []
        event = nxt[0]
        # Stops at a return: this is only called while an answered op is unplaced, and its
        # return event is still in the list. The head counts as a return so that a broken
        # invariant ends in an error, never in an endless walk around the circle.
        while not is_return[event]:
            candidates.append(op_of[event])
            event = nxt[event]
        if event == 0:
            raise AssertionError("linearizability search: no pending return event")
        for i in candidates:
            # A forced move: an op that reads the state without changing it (a get of the current
            # value, a remove -> False on an absent key). Placing it now is never worse than
            # later (it only ends an interval sooner), so it is the node's only branch. Without
            # this a burst of concurrent puts makes the search try their orders first.
            if (kind[i] == _GET and expected[i] == state) or (
                    kind[i] == _REMOVE and answered[i] and expected[i] == 0 and state == _ABSENT):
                return [[i], op_of[event], 0]
        candidates.sort(key=try_order.__getitem__)
        return [candidates, op_of[event], 0]

    def blame(value: int) -> int:
        """The first unplaced answered op that needs `value`: the culprit of a starved node."""
        for i in range(n):
            if answered[i] and not placed & bits[i] and value in needs[i]:
                return i
        raise AssertionError("a starved value with no op needing it")

    deepest = -1
    deepest_info: Tuple[int, int, List[int]] = (0, _ABSENT, [])
    undo: List[Tuple[int, int, int, int, bool]] = []  # per placed op: what it overwrote
    if unplaced_answered == 0:
        return None  # only unanswered writes: "none of them took effect" is a valid reading
    starved_value = starving(state)
    if starved_value >= 0:
        return _describe_failure(ops, values, 0, blame(starved_value), state, [])
    frames = [open_node()]
    while frames:
        frame = frames[-1]
        candidates, blocked, position = frame
        descended = False
        while position < len(candidates):
            i = candidates[position]
            position += 1
            if must_observe and not observes[i]:
                continue
            k = kind[i]
            if k == _PUT:
                new_state = arg[i]
            elif k == _GET:
                if state != expected[i]:
                    continue
                new_state = state
            else:
                if answered[i] and (state != _ABSENT) != (expected[i] == 1):
                    continue
                new_state = _ABSENT
            if answered[i]:
                new_placed, new_spent, new_must_observe = placed | bits[i], spent, False
            else:
                new_placed, new_spent, new_must_observe = placed, spent | bits[i], True
            if not is_new((new_placed, new_state, new_must_observe), new_spent):
                continue
            undo.append((i, state, placed, spent, must_observe))
            state, placed, spent, must_observe = new_state, new_placed, new_spent, new_must_observe
            take(i)
            if answered[i]:
                unplaced_answered -= 1
                if unplaced_answered == 0:
                    return None
            starved_value = starving(state)
            if starved_value < 0:
                lift(i)
                frame[2] = position
                frames.append(open_node())
                descended = True
                break
            if len(undo) > deepest:
                deepest = len(undo)
                deepest_info = (blame(starved_value), state, [entry[0] for entry in undo[-_DETAIL_OPS:]])
            i, state, placed, spent, must_observe = undo.pop()
            give_back(i)
            if answered[i]:
                unplaced_answered += 1
        if descended:
            continue
        # No candidate can go next after this prefix: `blocked` can never be placed from here.
        if len(undo) > deepest:
            deepest = len(undo)
            deepest_info = (blocked, state, [entry[0] for entry in undo[-_DETAIL_OPS:]])
        frames.pop()
        if undo:
            i, state, placed, spent, must_observe = undo.pop()
            unlift(i)
            give_back(i)
            if answered[i]:
                unplaced_answered += 1
    return _describe_failure(ops, values, deepest, *deepest_info)


def _describe_failure(ops: List[Operation], values: List[Any], depth: int, blocked_index: int,
                      state_id: int, tail_indexes: List[int]) -> dict:
    blocked = ops[blocked_index]
    state = values[state_id]  # values[_ABSENT] is None
    tail = tuple(ops[i] for i in tail_indexes)
    concurrent = tuple(
        op for op in ops
        if op is not blocked and op.invoke <= blocked.complete
        and (op.complete is None or op.complete >= blocked.invoke)
    )
    shown_state = "absent" if state is None else repr(state)
    lines = [f"key {blocked.key!r} is not linearizable: {blocked.describe()} cannot be placed "
             f"after the longest linearizable prefix found ({depth} ops), "
             f"where the key is {shown_state}."]
    if tail:
        lines.append("last ops of that prefix: " + "; ".join(op.describe() for op in tail))
    if concurrent:
        shown = "; ".join(op.describe() for op in concurrent[:8])
        more = f" (and {len(concurrent) - 8} more)" if len(concurrent) > 8 else ""
        lines.append(f"ops overlapping it: {shown}{more}")
    else:
        lines.append("no op overlaps it")
    return dict(blocked=blocked, state=state, prefix_tail=tail, concurrent=concurrent,
                explanation="\n".join(lines))


class History:
    """Records a concurrent history for check_operations. Safe to use from threads and from
    asyncio tasks (the lock is never held across an await). Usage per call:

        op_id = history.invoke(client, "put", key, value)   # just before sending
        ... send, await the reply ...
        history.complete(op_id, output)     # got an answer (get: value|None, remove: bool)
        history.discard(op_id)              # certainly never sent (e.g. connection refused)
        # no answer at all (timeout, reset): do nothing; the op stays "maybe done"
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._records: Dict[int, dict] = {}
        self._next_id = 0

    def invoke(self, client: Hashable, op: str, key: Hashable, value: Any = None) -> int:
        if op not in KV_OPS and op not in IGNORED_OPS:
            raise ValueError(f"unknown op {op!r}")
        with self._lock:
            # The clock is read under the lock so that ids follow invoke order.
            op_id = self._next_id
            self._next_id += 1
            self._records[op_id] = dict(client=client, op=op, key=key, value=value,
                                        invoke=self._clock(), complete=None, output=None)
        return op_id

    def complete(self, op_id: int, output: Any = None) -> None:
        now = self._clock()  # the reply is already in hand: any stamp from here on is valid
        with self._lock:
            record = self._records[op_id]
            if record["complete"] is not None:
                raise ValueError(f"operation {op_id} completed twice")
            record["complete"] = now
            record["output"] = output

    def discard(self, op_id: int) -> None:
        with self._lock:
            del self._records[op_id]

    def operations(self) -> List[Operation]:
        with self._lock:
            records = [dict(record) for record in self._records.values()]
        return [Operation(**record) for record in records]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def check(self, stop_at_first: bool = True) -> CheckResult:
        return check_operations(self.operations(), stop_at_first=stop_at_first)
