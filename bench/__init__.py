"""Benchmarks anyone can run: `python -m bench.proxy_bench`, `python -m bench.simulate_users`.

The scripts monkey-patch gevent first and only then import the helpers here, which expect
a patched standard library.
"""
