// A sidecar cache for session-authority: validates tokens through the service on a miss, answers
// repeats from memory, and drops an entry as soon as the event stream says its session was
// revoked, expired or rotated. It remembers the last sequence it applied and resumes from there
// when the stream breaks (a restart, a deploy), with the log epoch that sequence belongs to; on
// OUT_OF_RANGE, or a message of another log epoch (the store was restored from a backup, so the
// numbers repeat), it drops everything. It answers
// from memory only while the stream is live: from the `announce_live` heartbeat (sent once the
// replay of what it missed is done) until the stream breaks. An outage makes it miss, never lie.
'use strict';

const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, '..', '..', 'proto');

function loadProtos() {
  const definition = protoLoader.loadSync(
    ['session_authority/v1/sessions.proto', 'session_authority/v1/events.proto'],
    { includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).session_authority.v1;
}

class SessionCache {
  constructor(address) {
    const pkg = loadProtos();
    this.sessions = new pkg.SessionService(address, grpc.credentials.createInsecure());
    this.events = new pkg.EventService(address, grpc.credentials.createInsecure());
    this.byToken = new Map(); // token -> session
    this.lastSequence = null; // null: not yet connected
    this.epoch = null; // the log epoch lastSequence belongs to
    this.live = false; // true while connected and caught up
    this.serverCalls = 0;
    this.listeners = [];
  }

  /** Resolves with the session if the token is valid; from memory when cached. */
  async validate(token) {
    const cached = this.live && this.byToken.get(token);
    if (cached) return cached;
    this.serverCalls += 1;
    const reply = await new Promise((resolve, reject) =>
      this.sessions.ValidateSession({ token }, (err, r) => (err ? reject(err) : resolve(r))));
    if (this.live) this.byToken.set(token, reply.session);
    return reply.session;
  }

  drop(sessionId) {
    for (const [token, session] of this.byToken) {
      if (session.session_id === sessionId) this.byToken.delete(token);
    }
  }

  /** Follows the event stream for good: resumes after every break. */
  start() {
    this.stopped = false;
    this.watch();
  }

  stop() {
    this.stopped = true;
    if (this.call) this.call.cancel();
  }

  watch() {
    if (this.stopped) return;
    const request = this.lastSequence === null
      ? {}
      : { after_sequence: this.lastSequence, log_epoch: this.epoch };
    request.announce_live = true;
    this.call = this.events.WatchEvents(request);
    this.call.on('data', (item) => {
      const epoch = (item.event || item.heartbeat || {}).log_epoch;
      if (epoch && epoch !== '0') {
        if (this.epoch !== null && epoch !== this.epoch) {
          // A restored log: its sequence numbers mean other events. Trust nothing cached.
          this.byToken.clear();
          this.lastSequence = null;
        }
        this.epoch = epoch;
      }
      if (item.event) {
        const e = item.event;
        if (e.revoked || e.expired || e.rotated) this.drop(e.session_id);
        this.lastSequence = e.sequence;
        this.listeners.forEach((f) => f(e));
      } else if (item.heartbeat) {
        this.lastSequence = item.heartbeat.delivered_through;
        this.live = true; // the first heartbeat comes once the replay has caught up
      }
    });
    this.call.on('error', (err) => {
      this.live = false;
      if (err.code === grpc.status.OUT_OF_RANGE || this.lastSequence === null) {
        // Events were missed: nothing cached can be trusted. Start again from the head.
        this.byToken.clear();
        this.lastSequence = null;
        this.epoch = null;
      }
      if (!this.stopped) setTimeout(() => this.watch(), 100);
    });
    this.call.on('end', () => {
      this.live = false;
      if (!this.stopped) setTimeout(() => this.watch(), 100);
    });
  }

  /** Resolves once an event matching `predicate` has been applied. */
  waitFor(predicate, ms = 10000) {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('timed out waiting for an event')), ms);
      const listener = (e) => {
        if (predicate(e)) {
          clearTimeout(timer);
          this.listeners = this.listeners.filter((f) => f !== listener);
          resolve(e);
        }
      };
      this.listeners.push(listener);
    });
  }
}

module.exports = { SessionCache, loadProtos };
