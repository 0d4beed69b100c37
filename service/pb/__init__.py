"""Modules generated from protos/ by protos/generate.py (do not edit them).

They register their descriptors in `POOL`, a pool of their own, not protobuf's
default one: the KServe messages use upstream's package name (`inference`), and a
process that also imports another copy of them (tritonclient's, say) must not fail
with duplicate symbols.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
