-- A catalog as flywheel 62d1109 (before alembic) left it: tables from create_all, no quarantine table, no
-- rounds.finished_at, no annotations.ls_user_id. Made by that commit's Catalog; dumped with sqlite3 iterdump.
BEGIN TRANSACTION;
CREATE TABLE annotations (
	id INTEGER NOT NULL, 
	ls_annotation_id INTEGER NOT NULL, 
	ls_task_id INTEGER, 
	ls_project_id INTEGER, 
	sample_id INTEGER, 
	annotator VARCHAR(256) NOT NULL, 
	choices TEXT NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	problem TEXT, 
	ls_updated_at DATETIME NOT NULL, 
	seen_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (ls_annotation_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id)
);
INSERT INTO "annotations" VALUES(1,501,101,7,1,'ann@example.org','["cat"]','submitted',NULL,'2025-03-01 11:00:00.000000','2026-11-25 23:33:25.052554');
CREATE TABLE classes (
	name VARCHAR(256) NOT NULL, 
	position INTEGER NOT NULL, 
	PRIMARY KEY (name), 
	UNIQUE (position)
);
INSERT INTO "classes" VALUES('cat',0);
INSERT INTO "classes" VALUES('dog',1);
CREATE TABLE forecasts (
	round_id INTEGER NOT NULL, 
	forecast TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (round_id), 
	FOREIGN KEY(round_id) REFERENCES rounds (id)
);
CREATE TABLE label_history (
	id INTEGER NOT NULL, 
	sample_id INTEGER NOT NULL, 
	label VARCHAR(1024), 
	previous VARCHAR(1024), 
	reason VARCHAR(32) NOT NULL, 
	votes TEXT NOT NULL, 
	at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id)
);
CREATE TABLE label_reviews (
	id INTEGER NOT NULL, 
	sample_id INTEGER NOT NULL, 
	round_id INTEGER, 
	ls_project_id INTEGER NOT NULL, 
	ls_task_id INTEGER NOT NULL, 
	reasons TEXT NOT NULL, 
	label_before VARCHAR(1024) NOT NULL, 
	suggested VARCHAR(1024) NOT NULL, 
	self_confidence FLOAT, 
	status VARCHAR(16) NOT NULL, 
	label_after VARCHAR(1024), 
	reviewer VARCHAR(256), 
	created_at DATETIME NOT NULL, 
	resolved_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (sample_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id), 
	FOREIGN KEY(round_id) REFERENCES rounds (id), 
	UNIQUE (ls_task_id)
);
CREATE TABLE labels (
	id INTEGER NOT NULL, 
	sample_id INTEGER NOT NULL, 
	label VARCHAR(256) NOT NULL, 
	annotator VARCHAR(256) NOT NULL, 
	origin VARCHAR(32) NOT NULL, 
	ls_annotation_id INTEGER, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sample_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id), 
	UNIQUE (ls_annotation_id)
);
INSERT INTO "labels" VALUES(1,1,'cat','ann@example.org','labelstudio',501,'2026-11-25 23:33:25.053009');
CREATE TABLE meta (
	"key" VARCHAR(128) NOT NULL, 
	value VARCHAR(2048) NOT NULL, 
	PRIMARY KEY ("key")
);
INSERT INTO "meta" VALUES('ls_project_id','7');
CREATE TABLE provenance (
	id INTEGER NOT NULL, 
	sample_id INTEGER NOT NULL, 
	round_id INTEGER, 
	strategy VARCHAR(64), 
	params TEXT, 
	model_version VARCHAR(64), 
	score FLOAT, 
	rank INTEGER, 
	selected_at DATETIME, 
	annotations TEXT, 
	first_annotated_at DATETIME, 
	lead_time_s FLOAT, 
	annotations_read_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (sample_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id), 
	FOREIGN KEY(round_id) REFERENCES rounds (id)
);
CREATE TABLE reviews (
	sample_id INTEGER NOT NULL, 
	votes TEXT NOT NULL, 
	since DATETIME NOT NULL, 
	PRIMARY KEY (sample_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id)
);
CREATE TABLE rounds (
	id INTEGER NOT NULL, 
	strategy VARCHAR(64) NOT NULL, 
	n_labels INTEGER NOT NULL, 
	n_selected INTEGER NOT NULL, 
	model_version VARCHAR(64), 
	holdout_accuracy FLOAT, 
	test_accuracy FLOAT, 
	started_at DATETIME NOT NULL, 
	PRIMARY KEY (id)
);
INSERT INTO "rounds" VALUES(1,'random',0,2,NULL,NULL,NULL,'2025-03-01 10:00:00.000000');
CREATE TABLE samples (
	id INTEGER NOT NULL, 
	uri VARCHAR(2048) NOT NULL, 
	content_hash VARCHAR(64) NOT NULL, 
	source VARCHAR(256) NOT NULL, 
	split VARCHAR(8) NOT NULL, 
	truth VARCHAR(256), 
	fold INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (uri)
);
INSERT INTO "samples" VALUES(1,'file:///data/cat/0.png','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','/data','pool','cat',30,'2026-11-25 23:33:25.028921');
INSERT INTO "samples" VALUES(2,'file:///data/dog/0.png','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','/data','pool','dog',83,'2026-11-25 23:33:25.028926');
INSERT INTO "samples" VALUES(3,'file:///data/dog/1.png','cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc','/data','pool','dog',36,'2026-11-25 23:33:25.028927');
CREATE TABLE tasks (
	id INTEGER NOT NULL, 
	sample_id INTEGER NOT NULL, 
	ls_project_id INTEGER NOT NULL, 
	ls_task_id INTEGER NOT NULL, 
	round_id INTEGER, 
	model_version VARCHAR(64), 
	score FLOAT, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sample_id), 
	FOREIGN KEY(sample_id) REFERENCES samples (id), 
	UNIQUE (ls_task_id), 
	FOREIGN KEY(round_id) REFERENCES rounds (id)
);
INSERT INTO "tasks" VALUES(1,1,7,101,1,NULL,NULL,'2026-11-25 23:33:25.053602');
INSERT INTO "tasks" VALUES(2,2,7,102,1,NULL,NULL,'2026-11-25 23:33:25.053603');
CREATE TABLE webhook_events (
	id INTEGER NOT NULL, 
	received_at DATETIME NOT NULL, 
	action VARCHAR(64) NOT NULL, 
	ls_project_id INTEGER, 
	ls_annotation_ids TEXT NOT NULL, 
	body_sha256 VARCHAR(64) NOT NULL, 
	payload TEXT NOT NULL, 
	outcome TEXT NOT NULL, 
	emitted BOOLEAN NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_samples_split ON samples (split);
CREATE INDEX ix_samples_content_hash ON samples (content_hash);
CREATE INDEX ix_webhook_events_body_sha256 ON webhook_events (body_sha256);
CREATE INDEX ix_annotations_ls_task_id ON annotations (ls_task_id);
CREATE INDEX ix_annotations_sample_id ON annotations (sample_id);
CREATE INDEX ix_annotations_ls_project_id ON annotations (ls_project_id);
CREATE INDEX ix_label_history_sample_id ON label_history (sample_id);
CREATE INDEX ix_provenance_round_id ON provenance (round_id);
CREATE INDEX ix_label_reviews_status ON label_reviews (status);
COMMIT;
