"""Who may connect at all: `--allow-cidr`, and the addresses an operator blocked."""

from __future__ import annotations

import ipaddress
import logging

from sqlalchemy import select
from werkzeug.exceptions import Forbidden

from .extensions import db
from .models import BlockedNetwork

log = logging.getLogger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class NotAllowedAddress(Forbidden):
    description = "this client address may not use the proxy"


def parse_network(text: str) -> Network:
    """ "10.0.0.7" or "10.0.0.0/8" as a network (ValueError if neither)."""
    return ipaddress.ip_network(str(text).strip(), strict=False)


class NetworkRules:
    """Owns the allowed and blocked networks; checked before anything else on each request.

    Operators change the blocks through block() and unblock(), which write the database
    and replace the in-memory tuple whole, so a check never sees it half-changed.
    """

    def __init__(self, allowed: list[str]) -> None:
        self.allowed = tuple(parse_network(c) for c in allowed)
        self.blocked: tuple[Network, ...] = ()

    def check(self, address: str) -> None:
        """Raise NotAllowedAddress unless `address` may use the proxy."""
        if not self.allowed and not self.blocked:
            return
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            raise NotAllowedAddress() from None
        if self.allowed and not any(ip in net for net in self.allowed):
            raise NotAllowedAddress()
        if any(ip in net for net in self.blocked):
            raise NotAllowedAddress("this client address is blocked by an operator")

    def load(self) -> None:
        """Read the blocks (inside an app context)."""
        rows = db.session.scalars(select(BlockedNetwork)).all()
        self.blocked = tuple(parse_network(r.network) for r in rows)

    def block(self, text: str, note: str = "") -> str:
        """Block an address or network, now and after restarts; its normal form."""
        network = str(parse_network(text))
        if db.session.get(BlockedNetwork, network) is None:
            db.session.add(BlockedNetwork(network=network, note=note[:200]))
            db.session.commit()
        self.load()
        log.info("blocked client network %s", network)
        return network

    def unblock(self, text: str) -> bool:
        """Lift a block; whether there was one."""
        row = db.session.get(BlockedNetwork, str(parse_network(text)))
        if row is None:
            return False
        db.session.delete(row)
        db.session.commit()
        self.load()
        return True

    def listing(self) -> list[dict]:
        rows = db.session.scalars(select(BlockedNetwork).order_by(BlockedNetwork.network))
        return [{"network": r.network, "note": r.note} for r in rows]
