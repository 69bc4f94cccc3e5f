"""The distributed runtime: the launch environment, agreement between ranks, lost peers, the output lease, elastic restarts, preemption and the node launcher."""
