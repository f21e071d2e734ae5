"""`make bench`: the data path measured against the tools an administrator would reach for instead
(`cp`, `cp --sparse=always`, `rsync`, bare mmh3), in one run on the same generated disks.

`python -m benchmarks.run --help` for the options; the results land in docs/benchmarks.md and
docs/benchmarks.json.
"""
