// Runs the sidecar against a real server it starts itself ($SA_BIN), restarts the server under it,
// and checks the cache: hits, and evictions on revoke, rotate, and events missed while it was
// disconnected.
'use strict';

const { spawn } = require('child_process');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const { SessionCache, loadProtos } = require('./sidecar');

let passed = 0;
function check(condition, what) {
  if (!condition) {
    console.log(`FAILED: ${what}`);
    console.log(`${passed} passed, 1 failed`);
    process.exit(1);
  }
  passed += 1;
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function startServer(port, dataDir) {
  const child = spawn(process.env.SA_BIN, ['--listen', `127.0.0.1:${port}`, '--data-dir', dataDir,
    '--heartbeat-interval', '100ms'], { stdio: 'ignore' });
  for (let i = 0; i < 200; i += 1) {
    const ok = await new Promise((resolve) => {
      const socket = net.connect(port, '127.0.0.1', () => { socket.end(); resolve(true); });
      socket.on('error', () => resolve(false));
    });
    if (ok) return child;
    await sleep(50);
  }
  throw new Error('server did not start');
}

function stopServer(child) {
  return new Promise((resolve) => { child.on('exit', resolve); child.kill('SIGTERM'); });
}

// waitForReady: right after a restart the channel may still be backing off from the outage.
function call(client, method, request) {
  const metadata = new grpc.Metadata();
  metadata.setOptions({ waitForReady: true });
  const options = { deadline: Date.now() + 10000 };
  return new Promise((resolve, reject) =>
    client[method](request, metadata, options, (err, r) => (err ? reject(err) : resolve(r))));
}

async function main() {
  const port = await freePort();
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'sa-sidecar-'));
  let server = await startServer(port, path.join(dataDir, 'data'));
  const address = `127.0.0.1:${port}`;
  const pkg = loadProtos();
  const sessions = new pkg.SessionService(address, grpc.credentials.createInsecure());
  const cache = new SessionCache(address);
  cache.start();
  await sleep(300);

  const create = (user) => call(sessions, 'CreateSession', { tenant_id: 'node-co', user_id: user });
  const a = await create('alice');
  const b = await create('bob');
  const c = await create('carol');

  // Misses go to the service; repeats are answered from memory.
  for (const s of [a, b, c]) await cache.validate(s.token);
  const calls = cache.serverCalls;
  for (let i = 0; i < 100; i += 1) await cache.validate(a.token);
  check(cache.serverCalls === calls, 'repeated validations are answered from the cache');

  // A revoke evicts at once: the event arrives, the entry is gone, the service says no.
  const revokedSeen = cache.waitFor((e) => e.revoked && e.session_id === a.session.session_id);
  const reply = await call(sessions, 'RevokeSession', { session_id: a.session.session_id });
  const event = await revokedSeen;
  check(event.sequence === reply.sequence, 'the revoke event carries the reply\'s sequence');
  check(!cache.byToken.has(a.token), 'the revoked token left the cache');
  try {
    await cache.validate(a.token);
    check(false, 'a revoked token is not valid');
  } catch (err) {
    check(err.code === grpc.status.UNAUTHENTICATED, 'the service refuses the revoked token');
  }

  // A rotation drops the old token.
  const rotatedSeen = cache.waitFor((e) => e.rotated && e.session_id === b.session.session_id);
  const rotated = await call(sessions, 'RotateSession', { token: b.token });
  await rotatedSeen;
  check(!cache.byToken.has(b.token), 'the rotated token left the cache');
  check((await cache.validate(rotated.token)).session_id === b.session.session_id, 'the new token validates');

  // At a login or privilege change, rotate with privilege_change: the token from before dies at
  // once, with no grace period (against session fixation).
  const loggedIn = await call(sessions, 'RotateSession', { token: rotated.token, privilege_change: true });
  try {
    await call(sessions, 'ValidateSession', { token: rotated.token });
    check(false, 'the token from before the login is dead at once');
  } catch (err) {
    check(err.code === grpc.status.UNAUTHENTICATED, 'the pre-login token gets UNAUTHENTICATED');
  }
  check((await cache.validate(loggedIn.token)).session_id === b.session.session_id, 'the logged-in token validates');

  // The server restarts. While the sidecar is disconnected, carol's session is revoked; on
  // reconnecting it resumes from its last sequence and hears of it.
  check(cache.byToken.has(c.token), 'carol is cached before the restart');
  const before = cache.lastSequence;
  await stopServer(server);
  for (let i = 0; i < 100 && cache.live; i += 1) await sleep(20);
  try {
    await cache.validate(c.token);
    check(false, 'no answer from memory while the stream is down');
  } catch (err) {
    check(err.code !== grpc.status.UNAUTHENTICATED, 'during the outage the cache misses instead of answering from memory');
  }
  server = await startServer(port, path.join(dataDir, 'data'));
  const missedSeen = cache.waitFor((e) => e.revoked && e.session_id === c.session.session_id);
  await call(sessions, 'RevokeSession', { session_id: c.session.session_id });
  await missedSeen;
  check(!cache.byToken.has(c.token), 'a revocation during the outage reached the cache after it');
  check(Number(cache.lastSequence) > Number(before), 'the sidecar resumed from its last sequence');

  cache.stop();
  await stopServer(server);
  fs.rmSync(dataDir, { recursive: true, force: true });
  console.log(`node sidecar: ${passed} passed, 0 failed`);
  process.exit(0);
}

main().catch((err) => {
  console.log(`FAILED: ${err.stack || err}`);
  console.log(`${passed} passed, 1 failed`);
  process.exit(1);
});
