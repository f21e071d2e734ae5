"""A VM's network adapters at the recovery site: the network and subnet each connects to, its public IP."""
from __future__ import annotations

import ipaddress

from .errors import NetworkConfigError
from .manifest import VmStore
from .vm import NetworkAdapter, VirtualMachine, canonical_subnet, validate_segment, vm_name


class Networking(VmStore):
    """Places the network adapters of a host's VMs and gives them public IP addresses."""

    def connect_adapter(
        self, vm: VirtualMachine | str, adapter_name: str, network: str, subnet: str | None = None
    ) -> NetworkAdapter:
        """Connect a network adapter to `network` and, when given, `subnet` (CIDR, e.g. "10.1.0.0/24");
        a subnet of None detaches it from any subnet. Its public IP, if any, stays. Idempotent."""
        validate_segment(network, "network")
        subnet = canonical_subnet(subnet, f"adapter {adapter_name!r} of VM {vm_name(vm)!r}")
        with self._vm_lock(vm_name(vm)) as current:
            adapter = current.adapter(adapter_name)
            connected = NetworkAdapter(adapter.name, network, subnet, adapter.public_ip)
            return self._replace_adapter(current, adapter, connected)

    def assign_public_ip(self, vm: VirtualMachine | str, adapter_name: str, ip: str) -> NetworkAdapter:
        """Give a network adapter a public IP address (IPv4 or IPv6, stored in its canonical form).
        Idempotent."""
        where = f"VM {vm_name(vm)!r} on host {self.name!r}, adapter {adapter_name!r}"
        try:
            address = ipaddress.ip_address(ip)
        except (TypeError, ValueError):
            raise NetworkConfigError(f"{where}: {ip!r} is not an IPv4 or IPv6 address") from None
        if address.is_unspecified or address.is_loopback or address.is_multicast or address.is_link_local:
            raise NetworkConfigError(
                f"{where}: {ip!r} cannot be a VM's address (unspecified, loopback, multicast or link-local)"
            )
        with self._vm_lock(vm_name(vm)) as current:
            adapter = current.adapter(adapter_name)
            addressed = NetworkAdapter(adapter.name, adapter.vm_network, adapter.subnet, str(address))
            return self._replace_adapter(current, adapter, addressed)

    def _replace_adapter(self, vm: VirtualMachine, old: NetworkAdapter, new: NetworkAdapter) -> NetworkAdapter:
        if new != old:
            vm.network_adapters = [new if a.name == old.name else a for a in vm.network_adapters]
            self._write_manifest(vm)
        return new
