"""DNS analyses for mail authentication: SPF, DKIM, DMARC and MX.

Each ``analyse_*`` function takes plain parameters and a ``Resolver`` (``DnsResolver``
for a real server, any object with ``query(name, rdtype)`` in unit tests) and returns a
report whose ``findings`` explain every problem (domain, record, expected, found) and
whose ``answers`` hold the raw DNS answers as evidence. They are synchronous and
thread-safe: run many domains in a ThreadPoolExecutor over one shared resolver.
A DNS failure (timeout, SERVFAIL, REFUSED) raises ``TargetUnreachable``: never a pass.
"""

from opsdrill.dns.dkim import DkimReport, analyse_dkim
from opsdrill.dns.dmarc import DmarcReport, analyse_dmarc
from opsdrill.dns.findings import DnsReport, Finding
from opsdrill.dns.mx import MxReport, analyse_mx
from opsdrill.dns.resolver import DnsAnswer, DnsResolver, Resolver
from opsdrill.dns.spf import SpfNode, SpfReport, analyse_spf
from opsdrill.dns.spf_eval import SpfResult, check_host

__all__ = [
    "DkimReport",
    "DmarcReport",
    "DnsAnswer",
    "DnsReport",
    "DnsResolver",
    "Finding",
    "MxReport",
    "Resolver",
    "SpfNode",
    "SpfReport",
    "SpfResult",
    "analyse_dkim",
    "analyse_dmarc",
    "analyse_mx",
    "analyse_spf",
    "check_host",
]
