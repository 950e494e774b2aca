"""Stand-ins that benchmarks and tests both drive: the strict loopback fake Discord and its process driver."""
