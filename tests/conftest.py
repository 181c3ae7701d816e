"""Fixtures of real parts, shared by the whole suite.

Each fixture lives in its own module under tests/support/ and is proven by tests of its own.
"""

pytest_plugins = [
    "tests.support.origin",
    "tests.support.faulty",
    "tests.support.fusemount",
    "tests.support.images",
    "tests.support.cloud",
    "tests.support.seaweed",
    "tests.support.openstack",
    "tests.support.glance_proxy",
]
