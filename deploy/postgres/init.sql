-- The role walship connects as: replication for the stream, and
-- pg_monitor to read pg_replication_slots and pg_stat_replication.
CREATE ROLE walship LOGIN REPLICATION PASSWORD 'walship';
GRANT pg_monitor TO walship;
