"""What keeps the suite's parallel workers (pytest-xdist, pytest.ini) apart: the tests sharing a module's run are
one xdist group in the node ids the scheduler reads, and each worker's ports are its own (docs/testing.md)."""

import socket

import pytest

from conftest import SHARED_RUNS
from helpers import PORT_BASE, PORT_BLOCK, _worker_index, free_port


def _module(item) -> str:
    return getattr(getattr(item, 'module', None), '__name__', '')


def _group_of(item) -> str | None:
    marks = [m.args[0] for m in item.iter_markers('xdist_group')]
    return marks[0] if marks else None


def test_the_tests_sharing_a_run_form_one_group_the_scheduler_sees(request):
    """xdist's loadgroup scheduler groups by the `@group` ending of the node ids it gets from the workers; with
    pytest 9.2 xdist 3.8 wrote it where it is no longer read (pytest-xdist issue 1386), and every worker made
    each shared run again. Checked on this session's own items: run with the whole suite, every module of
    SHARED_RUNS is here."""
    sharing = [i for i in request.session.items if SHARED_RUNS.get(_module(i)) in getattr(i, 'fixturenames', ())]
    if not sharing:
        pytest.skip('no test of a module in SHARED_RUNS was collected with this one')
    for item in sharing:
        assert _group_of(item) == f'{_module(item)}.{SHARED_RUNS[_module(item)]}', item.nodeid
    if getattr(request.config.option, 'loadgroup', False):  # in an xdist worker under --dist loadgroup
        assert all(i.nodeid.endswith('@' + _group_of(i)) for i in sharing), [i.nodeid for i in sharing][:3]
    loners = [i for i in request.session.items if i not in sharing and _module(i) in SHARED_RUNS]
    assert all(_group_of(i) is None for i in loners)  # tests not using the run spread over the workers


def test_ports_come_from_this_workers_block_below_the_ephemeral_range():
    base = PORT_BASE + (_worker_index() % 12) * PORT_BLOCK
    ports = [free_port() for _ in range(20)]
    assert len(set(ports)) == 20 and all(base <= p < base + PORT_BLOCK for p in ports)
    try:
        with open('/proc/sys/net/ipv4/ip_local_port_range') as f:
            low = int(f.read().split()[0])
    except OSError:
        pytest.skip('no /proc/sys/net/ipv4/ip_local_port_range here')
    assert PORT_BASE + 12 * PORT_BLOCK <= low  # the kernel never hands out these ports on its own


def test_a_port_in_use_is_passed_over():
    last = free_port()
    base = PORT_BASE + (_worker_index() % 12) * PORT_BLOCK
    following = base + (last - base + 1) % PORT_BLOCK  # where the walk goes next
    with socket.socket() as s:
        s.bind(('127.0.0.1', following))
        s.listen()
        assert free_port() != following
