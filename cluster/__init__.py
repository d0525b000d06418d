"""hamta's cluster agent: leadership in ZooKeeper, the virtual IP, the shared spool, failover."""
