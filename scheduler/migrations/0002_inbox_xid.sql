-- Each inbox row records the transaction that wrote it, so that an owner reads only the rows
-- written since the oldest transaction still open at its previous read, however long the
-- inbox is (reading by primary key would read the whole backlog again at every notification).
ALTER TABLE inbox ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX inbox_by_xid ON inbox (partition, xid, id);
