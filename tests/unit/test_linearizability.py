# Tests of the linearizability checker: hand-made histories whose verdict is known, a brute-force
# oracle that the fast search must agree with on small random histories, simulated linearizable
# histories (must pass) with one provably wrong read planted in them (must fail), the History
# recorder under threads and asyncio, and a large history bounded only by a generous timeout.
import asyncio
import dataclasses
import itertools
import random
import threading

import pytest

from smrd.testing.linearizability import CheckResult, History, Operation, check_operations

try:  # the timeout marker exists only with the plugin; without it the test still runs
    import pytest_timeout  # noqa: F401

    generous_timeout = pytest.mark.timeout(300)
except ImportError:  # pragma: no cover
    def generous_timeout(function):
        return function


def put(key, value, invoke, complete, client=0):
    return Operation(client=client, op="put", key=key, value=value, invoke=invoke, complete=complete)


def get(key, output, invoke, complete, client=0):
    return Operation(client=client, op="get", key=key, output=output, invoke=invoke, complete=complete)


def remove(key, existed, invoke, complete, client=0):
    return Operation(client=client, op="remove", key=key, output=existed, invoke=invoke,
                     complete=complete)


def linearizable(ops) -> bool:
    result = check_operations(ops)
    assert isinstance(result, CheckResult)
    return result.ok


# -- histories whose verdict is known -------------------------------------------------------------

LINEARIZABLE = {
    "empty": [],
    "sequential": [put("a", "1", 0, 1), get("a", "1", 2, 3), remove("a", True, 4, 5),
                   get("a", None, 6, 7), remove("a", False, 8, 9), put("a", "2", 10, 11),
                   get("a", "2", 12, 13)],
    "read of a missing key": [get("a", None, 0, 1)],
    "concurrent writes, later read sees the first": [
        put("a", "1", 0, 10, 1), put("a", "2", 0, 10, 2), get("a", "1", 11, 12, 3)],
    "concurrent writes, later read sees the second": [
        put("a", "1", 0, 10, 1), put("a", "2", 0, 10, 2), get("a", "2", 11, 12, 3)],
    "read overlapping a write sees the old value": [
        put("a", "1", 0, 1), put("a", "2", 2, 5, 1), get("a", "1", 3, 4, 2)],
    "read overlapping a write sees the new value": [
        put("a", "1", 0, 1), put("a", "2", 2, 5, 1), get("a", "2", 3, 4, 2)],
    "reads overlapping a write flip once": [
        put("a", "1", 0, 1), put("a", "2", 2, 20, 1), get("a", "1", 3, 4, 2), get("a", "2", 5, 6, 2),
        get("a", "2", 7, 8, 3)],
    "unanswered put that took effect": [put("a", "1", 0, None), get("a", "1", 5, 6, 1)],
    "unanswered put that did not take effect": [put("a", "1", 0, None), get("a", None, 5, 6, 1)],
    "unanswered put that takes effect late": [
        put("a", "1", 0, 1), put("a", "2", 2, None, 1), get("a", "1", 3, 4, 2), get("a", "1", 50, 51, 2),
        get("a", "2", 60, 61, 2)],
    "unanswered remove that took effect": [
        put("a", "1", 0, 1), remove("a", None, 2, None, 1), get("a", None, 3, 4, 2)],
    "unanswered remove that did not take effect": [
        put("a", "1", 0, 1), remove("a", None, 2, None, 1), get("a", "1", 3, 4, 2)],
    "unanswered get is ignored": [put("a", "1", 0, 1), get("a", "zzz", 2, None, 1)],
    "unanswered put explains a remove": [put("a", "1", 0, None), remove("a", True, 5, 6, 1)],
    "equal times overlap": [put("a", "1", 0, 1), get("a", None, 1, 2, 1)],
    "integer and float times": [put("a", "1", 0, 1.5), get("a", "1", 2, 3)],
    "keys are independent": [put("a", "1", 0, 10), put("b", "1", 0, 10), get("b", "1", 11, 12),
                             get("a", "1", 11, 12, 1), remove("b", True, 13, 14), get("a", "1", 15, 16)],
    "a value written twice": [put("a", "1", 0, 1), put("a", "2", 2, 3), put("a", "1", 4, 10, 1),
                              get("a", "2", 5, 6, 2), get("a", "1", 7, 8, 3)],
    "concurrent removes, one existed": [
        put("a", "1", 0, 1), remove("a", True, 2, 5, 1), remove("a", False, 2, 5, 2)],
}

VIOLATIONS = {
    "stale read after a completed write": [
        put("a", "1", 0, 1), put("a", "2", 2, 3), get("a", "1", 4, 5, 1)],
    "read of a never-written value": [put("a", "1", 0, 1), get("a", "9", 2, 3, 1)],
    "read before the write was invoked": [get("a", "1", 0, 1, 1), put("a", "1", 2, 3)],
    "two reads observe concurrent writes in opposite orders": [
        put("a", "1", 0, 10, 1), put("a", "2", 0, 10, 2),
        get("a", "1", 1, 2, 3), get("a", "2", 3, 4, 3),
        get("a", "2", 1, 2, 4), get("a", "1", 3, 4, 4)],
    "reads disagree after the writes ended": [
        put("a", "1", 0, 10, 1), put("a", "2", 0, 10, 2),
        get("a", "1", 11, 12, 3), get("a", "2", 13, 14, 3)],
    "lost acknowledged write": [put("a", "1", 0, 1), get("a", None, 2, 3, 1)],
    "lost acknowledged write among others": [
        put("a", "1", 0, 1), put("b", "1", 0, 1), put("a", "2", 2, 3), get("a", "1", 4, 5, 1)],
    "a remove reports existing twice": [
        put("a", "1", 0, 1), remove("a", True, 2, 3, 1), remove("a", True, 4, 5, 2)],
    "concurrent removes both report existing": [
        put("a", "1", 0, 1), remove("a", True, 2, 5, 1), remove("a", True, 2, 5, 2)],
    "remove reports missing on a present key": [put("a", "1", 0, 1), remove("a", False, 2, 3, 1)],
    "remove reports existing on a missing key": [remove("a", True, 0, 1)],
    "a value comes back after being overwritten": [
        put("a", "1", 0, 1), put("a", "2", 2, None, 1), get("a", "2", 3, 4, 2), get("a", "1", 5, 6, 2)],
    "value read before the remove that already completed": [
        put("a", "1", 0, 1), remove("a", True, 2, 3), get("a", "1", 4, 5, 1)],
}


@pytest.mark.parametrize("name", sorted(LINEARIZABLE))
def test_known_linearizable(name):
    result = check_operations(LINEARIZABLE[name])
    assert result.ok, result.explanation
    assert bool(result)
    assert brute_force(LINEARIZABLE[name])


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_known_violation(name):
    ops = VIOLATIONS[name]
    result = check_operations(ops)
    assert not result.ok
    assert not bool(result)
    assert not brute_force(ops)
    assert result.key == "a"
    assert result.blocked in ops and result.blocked.complete is not None
    assert result.blocked in result.ops
    assert "'a'" in result.explanation and result.explanation == str(result)


def test_failure_report_names_the_stale_read_and_the_prefix():
    ops = VIOLATIONS["stale read after a completed write"]
    result = check_operations(ops)
    assert result.blocked == ops[2]
    assert result.state == "2"
    assert result.prefix_tail == (ops[0], ops[1])
    assert result.concurrent == ()
    assert "get('a') -> '1'" in result.explanation
    assert result.ops == (ops[0], ops[1], ops[2])


def test_failure_report_lists_overlapping_ops():
    ops = VIOLATIONS["two reads observe concurrent writes in opposite orders"]
    result = check_operations(ops)
    assert set(result.concurrent) <= set(ops)
    assert result.concurrent, "the writes overlap every read"
    assert result.blocked not in result.concurrent


def test_only_the_failing_key_is_reported():
    ops = LINEARIZABLE["keys are independent"] + [
        put("c", "1", 0, 1), get("c", "2", 2, 3), put("d", "1", 0, 1), get("d", None, 2, 3)]
    first = check_operations(ops)
    assert not first.ok and first.key == "c" and first.failing_keys == ("c",)
    every = check_operations(ops, stop_at_first=False)
    assert every.key == "c" and every.failing_keys == ("c", "d")


def test_dicts_are_accepted_and_size_scan_ignored():
    ops = [dict(client=1, op="put", key="a", value="1", invoke=0, complete=1),
           dict(client=1, op="size", key=None, invoke=2, complete=3, output=1),
           dict(client=2, op="scan", key=None, invoke=2, complete=3, output={"a": "1"}),
           dict(client=2, op="get", key="a", invoke=4, complete=5, output="1")]
    result = check_operations(ops)
    assert result.ok and result.checked == 2 and result.ignored == 2


@pytest.mark.parametrize("bad", [
    dict(client=1, op="put", key="a", value="1", invoke=5, complete=4),
    dict(client=1, op="append", key="a", value="1", invoke=0, complete=1),
    dict(client=1, op="put", key="a", invoke=0, complete=1),
    dict(client=1, op="remove", key="a", invoke=0, complete=1, output="OK"),
    dict(client=1, op="get", key="a", invoke=0, completed=1),
])
def test_malformed_operations_are_refused(bad):
    with pytest.raises((ValueError, TypeError)):
        check_operations([bad])


# -- a brute-force oracle for small histories ------------------------------------------------------

def brute_force(ops) -> bool:
    """Try every subset of the unanswered writes and every order that respects real time."""
    by_key = {}
    for op in ops:
        by_key.setdefault(op.key, []).append(op)
    return all(_brute_force_key(key_ops) for key_ops in by_key.values())


def _brute_force_key(ops) -> bool:
    answered = [op for op in ops if op.complete is not None]
    unanswered = [op for op in ops if op.complete is None and op.op != "get"]
    for size in range(len(unanswered) + 1):
        for subset in itertools.combinations(unanswered, size):
            if _some_order_works(answered + list(subset)):
                return True
    return False


def _some_order_works(ops) -> bool:
    def extend(remaining, state):
        if not remaining:
            return True
        for index, op in enumerate(remaining):
            others = remaining[:index] + remaining[index + 1:]
            # op can go next only if no other remaining op had returned before op was invoked
            if any(other.complete is not None and other.complete < op.invoke for other in others):
                continue
            if op.op == "put":
                new_state = op.value
            elif op.op == "get":
                if op.output != state:
                    continue
                new_state = state
            else:
                if op.complete is not None and op.output != (state is not None):
                    continue
                new_state = None
            if extend(others, new_state):
                return True
        return False

    return extend(list(ops), None)


def random_small_history(rng: random.Random):
    ops = []
    for n in range(rng.randint(1, 7)):
        invoke = rng.randint(0, 8)
        complete = None if rng.random() < 0.2 else invoke + rng.randint(0, 4)
        kind = rng.choice(("put", "get", "remove"))
        key = rng.choice(("a", "a", "b"))
        if kind == "put":
            ops.append(Operation(client=n, op="put", key=key, value=rng.choice("12"), invoke=invoke,
                                 complete=complete))
        elif kind == "get":
            ops.append(Operation(client=n, op="get", key=key, output=rng.choice((None, "1", "2")),
                                 invoke=invoke, complete=complete))
        else:
            ops.append(Operation(client=n, op="remove", key=key, output=rng.random() < 0.5,
                                 invoke=invoke, complete=complete))
    return ops


def test_agrees_with_brute_force_on_small_random_histories():
    rng = random.Random(20261128)
    verdicts = {True: 0, False: 0}
    for case in range(4000):
        ops = random_small_history(rng)
        expected = brute_force(ops)
        assert check_operations(ops).ok == expected, f"case {case}: {ops}"
        verdicts[expected] += 1
    assert min(verdicts.values()) > 500, verdicts  # both verdicts are well exercised


# -- simulated linearizable histories, then one planted violation ---------------------------------

def simulate(rng: random.Random, clients: int, ops_per_client: int, keys, p_unanswered=0.0,
             max_duration=1.0, mean_gap=0.2):
    """Clients issue ops one after another; each op takes effect at a random point inside its
    interval (an unanswered one: maybe not at all); outputs come from applying ops in that order.
    Every put writes a distinct value."""
    planned = []
    for client in range(clients):
        now = rng.uniform(0, 1)
        for n in range(ops_per_client):
            invoke = now + rng.expovariate(1 / mean_gap)
            duration = rng.uniform(0.01, max_duration)
            point = invoke + duration * rng.uniform(0.01, 0.99)
            answered = rng.random() >= p_unanswered
            takes_effect = answered or rng.random() < 0.5
            kind = rng.choice(("put", "put", "get", "get", "remove"))
            fields = dict(client=client, op=kind, key=rng.choice(keys), invoke=invoke,
                          complete=invoke + duration if answered else None,
                          value=f"v{client}.{n}" if kind == "put" else None)
            planned.append((point, takes_effect, fields))
            now = invoke + duration
    state = {}
    ops = []
    for _, takes_effect, fields in sorted(planned, key=lambda plan: plan[0]):
        output = None
        if takes_effect:
            if fields["op"] == "put":
                state[fields["key"]] = fields["value"]
            elif fields["op"] == "get":
                output = state.get(fields["key"])
            else:
                output = state.pop(fields["key"], None) is not None
        ops.append(Operation(output=output, **fields))
    return sorted(ops, key=lambda op: op.invoke)


def plant_stale_read(rng: random.Random, ops):
    """Make one answered get return a value that is provably impossible: the value of a put that
    had completed before another put of the same key was invoked, which itself completed before
    the get was invoked (values are distinct, so the old value can never come back). None if the
    history has no such triple."""
    puts = [op for op in ops if op.op == "put" and op.complete is not None]
    gets = [index for index, op in enumerate(ops) if op.op == "get" and op.complete is not None]
    rng.shuffle(gets)
    for index in gets:
        read = ops[index]
        newer = [p for p in puts if p.key == read.key and p.complete < read.invoke]
        for new in newer:
            older = [p for p in puts if p.key == read.key and p.complete < new.invoke]
            if older:
                corrupted = list(ops)
                corrupted[index] = dataclasses.replace(read, output=rng.choice(older).value)
                return corrupted
    return None


def plant_lost_write(rng: random.Random, ops):
    """Make one answered get return NOT_FOUND where that is provably impossible: a put of the key
    completed before the get was invoked and the key is never removed."""
    removed = {op.key for op in ops if op.op == "remove"}
    puts = [op for op in ops if op.op == "put" and op.complete is not None]
    candidates = [index for index, op in enumerate(ops)
                  if op.op == "get" and op.complete is not None and op.key not in removed
                  and any(p.key == op.key and p.complete < op.invoke for p in puts)]
    if not candidates:
        return None
    index = rng.choice(candidates)
    corrupted = list(ops)
    corrupted[index] = dataclasses.replace(ops[index], output=None)
    return corrupted


@pytest.mark.parametrize("seed", range(40))
def test_simulated_histories_pass_and_planted_stale_reads_fail(seed):
    rng = random.Random(seed)
    ops = simulate(rng, clients=rng.randint(2, 8), ops_per_client=rng.randint(5, 60),
                   keys=["a", "b", "c"][:rng.randint(1, 3)], p_unanswered=rng.choice((0, 0.05, 0.2)),
                   max_duration=rng.choice((0.1, 0.5, 1.5)))
    result = check_operations(ops)
    assert result.ok, f"seed {seed}: {result.explanation}"
    corrupted = plant_stale_read(rng, ops)
    if corrupted is not None:
        assert not check_operations(corrupted).ok, f"seed {seed}: stale read not caught"
    # A read of a value nobody wrote is always a violation.
    reads = [index for index, op in enumerate(ops) if op.op == "get" and op.complete is not None]
    if reads:
        index = rng.choice(reads)
        corrupted = list(ops)
        corrupted[index] = dataclasses.replace(ops[index], output="never-written")
        assert not check_operations(corrupted).ok, f"seed {seed}: phantom read not caught"


def test_planted_violations_are_found_often_enough():
    """The planting helpers find provable violations in most simulated histories, so the
    randomized tests above are not vacuous."""
    stale = lost = 0
    for seed in range(60):
        rng = random.Random(1000 + seed)
        ops = simulate(rng, clients=4, ops_per_client=30, keys=["a", "b"], p_unanswered=0.05)
        assert check_operations(ops).ok, f"seed {1000 + seed}"
        stale_history = plant_stale_read(rng, ops)
        if stale_history is not None:
            stale += 1
            assert not check_operations(stale_history).ok, f"seed {1000 + seed}"
        lost_history = plant_lost_write(rng, [op for op in ops if op.op != "remove"])
        if lost_history is not None:
            lost += 1
            assert not check_operations(lost_history).ok, f"seed {1000 + seed}"
    assert stale > 40 and lost > 40, (stale, lost)


def test_small_simulated_histories_agree_with_brute_force():
    for seed in range(300):
        rng = random.Random(5000 + seed)
        ops = simulate(rng, clients=3, ops_per_client=2, keys=["a"], p_unanswered=0.3, max_duration=2.0)
        assert brute_force(ops), f"seed {5000 + seed}"
        assert check_operations(ops).ok, f"seed {5000 + seed}"
        reads = [index for index, op in enumerate(ops) if op.op == "get" and op.complete is not None]
        if reads:
            index = rng.choice(reads)
            corrupted = list(ops)
            corrupted[index] = dataclasses.replace(ops[index], output=rng.choice([None] + [
                op.value for op in ops if op.op == "put"]))
            assert check_operations(corrupted).ok == brute_force(corrupted), f"seed {5000 + seed}"


# -- the recorder ---------------------------------------------------------------------------------

class _Register:
    """A linearizable map: every call happens atomically under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries = {}

    def apply(self, op, key, value=None):
        with self.lock:
            if op == "put":
                self.entries[key] = value
                return None
            if op == "get":
                return self.entries.get(key)
            return self.entries.pop(key, None) is not None


def test_history_records_threads_and_checks():
    history = History()
    register = _Register()

    def client(number):
        rng = random.Random(number)
        for n in range(150):
            op = rng.choice(("put", "get", "remove"))
            key = rng.choice("ab")
            value = f"{number}.{n}" if op == "put" else None
            op_id = history.invoke(number, op, key, value)
            output = register.apply(op, key, value)
            if rng.random() < 0.02:
                continue  # as if the reply were lost: the op stays unanswered
            history.complete(op_id, output)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ops = history.operations()
    assert len(ops) == len(history) == 900
    assert all(op.complete is None or op.complete >= op.invoke for op in ops)
    assert any(op.complete is None for op in ops)
    result = history.check()
    assert result.ok, result.explanation


def test_history_discard_and_double_complete():
    clock = itertools.count()
    history = History(clock=lambda: next(clock))
    first = history.invoke("c", "put", "a", "1")
    history.complete(first)
    never_sent = history.invoke("c", "put", "a", "2")
    history.discard(never_sent)
    read = history.invoke("c", "get", "a")
    history.complete(read, "1")
    assert [(op.op, op.invoke, op.complete) for op in history.operations()] == [
        ("put", 0, 1), ("get", 3, 4)]
    with pytest.raises(ValueError):
        history.complete(read, "1")
    with pytest.raises(ValueError):
        history.invoke("c", "append", "a")
    assert history.check().ok


def test_history_from_asyncio_tasks():
    history = History()
    register = _Register()

    async def client(number):
        for n in range(50):
            op_id = history.invoke(number, "put", "k", f"{number}.{n}")
            await asyncio.sleep(0)
            register.apply("put", "k", f"{number}.{n}")
            await asyncio.sleep(0)
            history.complete(op_id)
            op_id = history.invoke(number, "get", "k")
            await asyncio.sleep(0)
            value = register.apply("get", "k")
            await asyncio.sleep(0)
            history.complete(op_id, value)

    async def run_all():
        await asyncio.gather(*(client(number) for number in range(5)))

    asyncio.run(run_all())
    assert len(history) == 500
    assert history.check().ok


# -- size ------------------------------------------------------------------------------------------

@generous_timeout
def test_thousands_of_ops_on_one_key():
    rng = random.Random(7)
    ops = simulate(rng, clients=16, ops_per_client=250, keys=["hot"], p_unanswered=0.02,
                   max_duration=2.0)
    assert len(ops) == 4000
    assert check_operations(ops).ok
    corrupted = plant_stale_read(rng, ops)
    assert corrupted is not None
    assert not check_operations(corrupted).ok


@generous_timeout
def test_many_keys_and_high_concurrency():
    rng = random.Random(8)
    ops = simulate(rng, clients=64, ops_per_client=300, keys=[f"k{n}" for n in range(8)],
                   p_unanswered=0.05, max_duration=5.0)
    assert check_operations(ops).ok
