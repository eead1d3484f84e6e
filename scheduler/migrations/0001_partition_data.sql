-- Partition data: every primary key starts with the partition (or, for runs and their
-- counters, with the campaign), so the tables can be distributed by it. Ids are compared
-- bytewise (COLLATE "C"), the order the key-value stores keep.

-- The owner's epoch of each partition: a partition transaction applies only while the epoch
-- it was decided under is the one recorded here.
CREATE TABLE partitions (
    id integer PRIMARY KEY,
    epoch bigint NOT NULL,
    owner text NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);

-- One version per transaction, as a key-value store's revision: the etag of optimistic
-- concurrency and the order of the delivery feed.
CREATE SEQUENCE versions;

CREATE TABLE contacts (
    partition integer NOT NULL,
    id text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (partition, id)
);

-- An owner lists its inbox by primary key and reads new entries in version order.
CREATE TABLE inbox (
    partition integer NOT NULL,
    id text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (partition, id)
);

CREATE TABLE timers (
    partition integer NOT NULL,
    due_ms bigint NOT NULL,
    id text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (partition, due_ms, id)
);

CREATE TABLE deliveries (
    partition integer NOT NULL,
    id text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    webhook text COLLATE "C" NOT NULL,
    campaign text COLLATE "C" NOT NULL,
    contact text COLLATE "C" NOT NULL,
    run text COLLATE "C" NOT NULL,
    status text NOT NULL,
    created_ms bigint NOT NULL,
    PRIMARY KEY (partition, id)
);
CREATE INDEX deliveries_by_webhook ON deliveries (webhook, partition, id);
CREATE INDEX deliveries_by_campaign ON deliveries (campaign, partition, id);
CREATE INDEX deliveries_by_contact ON deliveries (contact, partition, id);
CREATE INDEX deliveries_by_run ON deliveries (run, partition, id) WHERE run <> '';
CREATE INDEX deliveries_by_status ON deliveries (status, partition, id);
-- The delivery feed reads recent versions; a block-range index costs next to nothing to keep.
CREATE INDEX deliveries_by_version ON deliveries USING brin (version);

CREATE TABLE standings (
    partition integer NOT NULL,
    contact text COLLATE "C" NOT NULL,
    campaign text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (partition, contact, campaign)
);

CREATE TABLE runs (
    campaign text COLLATE "C" NOT NULL,
    run text COLLATE "C" NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (campaign, run)
);

CREATE TABLE shards (
    campaign text COLLATE "C" NOT NULL,
    run text COLLATE "C" NOT NULL,
    partition integer NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL,
    PRIMARY KEY (campaign, run, partition)
);

CREATE TABLE idempotency (
    key text COLLATE "C" PRIMARY KEY,
    created_ms bigint NOT NULL,
    value bytea NOT NULL,
    version bigint NOT NULL
);
