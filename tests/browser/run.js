#!/usr/bin/env node
'use strict'
// Browser tests of mesa-rs in Debian's chromium, driven by playwright-core.
//
// Usage: node run.js SCENARIO --mesa PATH_TO_MESA_BINARY [--out DIR] [--demo-png FILE]
//
//   chat        two pages chat through `mesa serve --demo --redis --sync` (its own
//               redis-server): login, who is online, typing indicator, messages both
//               ways, and on return the room's history kept by the page with the
//               message missed while offline redelivered ("not joined" before login)
//   rooms       three pages on two replicas (`mesa serve --demo --redis` twice, one
//               redis-server): two join a room on different replicas, one posts,
//               the other gets it with its room; a page in another room (created by
//               name, #general left) does not; who is online per room (the room's
//               presence) shows both, and loses one when it leaves the room or closes
//               its page, and a page back in six rooms at once lists itself in each;
//               a refused subscribe rejects with the server's code and reason
//   presence    clients/js in a page of the demo (not logged in), against two replicas:
//               presence() before subscribing is refused, then over both replicas
//               who is in a room counts an id's tabs, and join and leave events come
//               once per id, in order, to the subscription with presence only
//   recovery    clients/js in a page (served from clients/js/index.js) against
//               `mesa serve --auth dev --redis --rooms authenticated --recover-rooms
//               'chat:*' --recover-users`: the page subscribes to chat:1, the server
//               is killed with SIGKILL, room messages and sends to the page's id are
//               dispatched meanwhile, another server starts on the address; the page
//               reconnects by itself, reports its positions (`since` in its
//               subscribe and in its opt-in), gets every message once, in order per
//               stream, and sees `recovered: true` for the room and its id; a server
//               without rooms is sent no position
//   reconnect   the server restarts under a page: the banner shows the next retry
//               time, who is online greys out, a message sent meanwhile is queued,
//               and the page recovers
//   js-client   the published mesa-js-client 1.4.8 (its UMD build) in a page:
//               connects to `mesa serve --auth dev`, authenticates, exchanges messages
//   tls         the demo over https:// and wss:// (`mesa serve --demo --tls-cert C
//               --tls-key K`, given as `--tls-cert C --tls-key K` here); chromium
//               trusts that one certificate by its public key's SHA-256
//               (--ignore-certificate-errors-spki-list), nothing else
//
// Screenshots go to DIR (default target/browser-screenshots) as SCENARIO-*.png; the
// previous ones of the same scenario are removed first. `--demo-png FILE` also saves
// the chat screenshot there (docs/demo.png). Chromium is /usr/bin/chromium unless
// CHROMIUM says otherwise. Progress goes to stderr; the last stdout line is
// {"ok":true,...} or {"ok":false,"error":...}; exit code 0 means the scenario passed.
// Every wait is bounded and the whole run stops after RUN_TIMEOUT.

const { spawn, execFileSync } = require('child_process')
const crypto = require('crypto')
const fs = require('fs')
const http = require('http')
const net = require('net')
const os = require('os')
const path = require('path')
const readline = require('readline')
const { chromium } = require('playwright-core')

const RUN_TIMEOUT = 90000 // ms for a whole scenario
const WAIT = 15000 // ms for any single wait
const LAUNCH_FLAGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking',
  '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-quic'
]

const args = process.argv.slice(2)
const scenario = args[0]
const option = name => {
  const i = args.indexOf(name)
  return i >= 0 ? args[i + 1] : undefined
}
const root = path.resolve(__dirname, '..', '..')
const mesaBin = option('--mesa')
const outDir = path.resolve(option('--out') || path.join(root, 'target', 'browser-screenshots'))
const demoPng = option('--demo-png')
const chromiumPath = process.env.CHROMIUM || '/usr/bin/chromium'

const cleanup = [] // run in reverse at exit
const log = (...parts) => process.stderr.write(`[browser ${scenario}] ${parts.join(' ')}\n`)

function finish (result) {
  process.stdout.write(JSON.stringify(result) + '\n')
  return result.ok ? 0 : 1
}

// ----- processes -----

function freePort () {
  return new Promise((resolve, reject) => {
    const server = net.createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address()
      server.close(() => resolve(port))
    })
  })
}

// Start a child process, keep its output for failure reports, and kill it at exit.
function start (name, command, argv) {
  const child = spawn(command, argv, { stdio: ['ignore', 'pipe', 'pipe'] })
  const proc = { name, child, lines: [], stderr: [] }
  readline.createInterface({ input: child.stdout }).on('line', line => proc.lines.push(line))
  readline.createInterface({ input: child.stderr }).on('line', line => {
    proc.stderr.push(line)
    if (proc.stderr.length > 200) proc.stderr.shift()
  })
  proc.exited = new Promise(resolve => child.once('exit', code => resolve(code)))
  cleanup.push(() => { if (child.exitCode === null) child.kill('SIGKILL') })
  return proc
}

async function waitFor (what, predicate, timeout = WAIT) {
  const deadline = Date.now() + timeout
  for (;;) {
    const value = await predicate()
    if (value) return value
    if (Date.now() > deadline) throw new Error(`no ${what} within ${timeout} ms`)
    await new Promise(resolve => setTimeout(resolve, 25))
  }
}

// `mesa serve ARGS`; resolves with the process and the URLs it announces.
async function mesaServe (argv) {
  const proc = start('mesa', mesaBin, ['serve', ...argv])
  const line = prefix => proc.lines.find(l => l.startsWith(prefix))
  try {
    await waitFor('`mesa listening on` line', () => line('mesa listening on ') || proc.child.exitCode !== null)
  } catch (error) {
    throw new Error(`${error.message}; mesa stderr:\n${proc.stderr.join('\n')}`)
  }
  if (proc.child.exitCode !== null) throw new Error(`mesa serve exited: ${proc.stderr.join('\n')}`)
  const ws = line('mesa listening on ').slice('mesa listening on '.length)
  const demo = line('mesa demo on ')
  return { proc, ws, page: demo && demo.slice('mesa demo on '.length) }
}

// `mesa dispatch ARGS` with `env` and no other MESA_* variable, to its end; rejects
// with its stderr when it fails.
function mesaDispatch (argv, env) {
  const clean = Object.fromEntries(Object.entries(process.env).filter(([key]) => !key.startsWith('MESA_')))
  return new Promise((resolve, reject) => {
    const child = spawn(mesaBin, ['dispatch', ...argv], { stdio: ['ignore', 'ignore', 'pipe'], env: { ...clean, ...env } })
    const stderr = []
    child.stderr.on('data', chunk => stderr.push(chunk))
    const timer = setTimeout(() => child.kill('SIGKILL'), WAIT)
    child.once('exit', code => {
      clearTimeout(timer)
      if (code === 0) resolve()
      else reject(new Error(`mesa dispatch ${argv.join(' ')} exited with ${code}: ${Buffer.concat(stderr)}`))
    })
  })
}

async function stop (proc) {
  if (proc.child.exitCode === null) proc.child.kill('SIGTERM')
  const code = await Promise.race([proc.exited, new Promise(resolve => setTimeout(() => resolve('timeout'), WAIT))])
  if (code === 'timeout') {
    proc.child.kill('SIGKILL')
    throw new Error(`${proc.name} did not stop on SIGTERM`)
  }
}

async function redisServer () {
  const port = await freePort()
  const proc = start('redis-server', 'redis-server', [
    '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'
  ])
  await waitFor('redis-server to listen', () => new Promise(resolve => {
    const socket = net.connect(port, '127.0.0.1', () => { socket.destroy(); resolve(true) })
    socket.on('error', () => resolve(false))
  }))
  return `redis://127.0.0.1:${port}/`
}

// ----- the browser -----

async function browser (flags = []) {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mesa-chromium-'))
  cleanup.push(() => fs.rmSync(userDataDir, { recursive: true, force: true }))
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: chromiumPath,
    headless: true,
    args: [...LAUNCH_FLAGS, ...flags],
    viewport: { width: 900, height: 560 },
    timeout: WAIT
  })
  cleanup.push(() => context.close().catch(() => {}))
  return context
}

// A page with its console errors and uncaught exceptions collected.
async function newPage (context, label) {
  const page = await context.newPage()
  page.setDefaultTimeout(WAIT)
  page.problems = []
  page.on('pageerror', error => page.problems.push(`${label}: ${error.message}`))
  page.on('console', message => {
    // Refused reconnection attempts are expected while a server restarts.
    const expected = /WebSocket connection to .* failed|Failed to load resource/
    if (message.type() === 'error' && !expected.test(message.text())) {
      page.problems.push(`${label} console: ${message.text()}`)
    }
  })
  return page
}

const shots = []
async function screenshot (page, name) {
  const file = path.join(outDir, `${scenario}-${name}.png`)
  await page.screenshot({ path: file })
  shots.push(path.relative(root, file))
  log('screenshot', file)
  return file
}

async function login (page, url, nick) {
  await page.goto(url)
  // Before joining the page says so, not "offline".
  const before = await page.$eval('#status', e => e.textContent)
  if (before !== 'not joined') throw new Error(`the status before joining: ${before}`)
  await page.fill('#nick', nick)
  await page.click('#join')
  await page.waitForFunction(n => document.getElementById('status').textContent === `online as ${n}`, nick)
}

// Click room `room` in the page's list (joining it if the page is not in it) and wait
// until the page shows it.
async function openRoom (page, room) {
  await page.click(`#room-list li[data-room="${room}"]`)
  await page.waitForFunction(r => document.getElementById('room-title').textContent === `#${r}`, room)
}

// Keep every message the page's client hands to the page in `window.received`.
const recordMessages = page => page.evaluate(() => {
  window.received = []
  window.mesa.on('message', message => window.received.push(message))
})
const received = page => page.evaluate(() => window.received)

const texts = page => page.$$eval('#messages li .text', items => items.map(i => i.textContent))
const onlineIds = page => page.$$eval('#online li', items => items.map(i => i.textContent.replace(' (you)', '')))

async function say (page, text) {
  await page.fill('#text', text)
  await page.click('#send')
}

async function seeMessage (page, text) {
  await waitFor(`message "${text}"`, async () => (await texts(page)).includes(text))
}

// ----- scenarios -----

const scenarios = {
  // Two pages chat through `mesa serve --demo` (with Redis and sync).
  async chat () {
    const redis = await redisServer()
    const server = await mesaServe([
      '--demo', '--listen', '127.0.0.1:0', '--redis', redis, '--sync', '--reconnect-interval', '500'
    ])
    const context = await browser()
    const alice = await newPage(context, 'alice')
    const bob = await newPage(context, 'bob')
    await login(alice, server.page, 'alice')
    await login(bob, server.page, 'bob')
    await waitFor('bob online on alice\'s page', async () => (await onlineIds(alice)).includes('bob'))
    await waitFor('alice online on bob\'s page', async () => (await onlineIds(bob)).includes('alice'))

    await say(bob, 'Hello Alice!')
    await seeMessage(alice, 'Hello Alice!')
    await seeMessage(bob, 'Hello Alice!')
    await say(alice, 'Hi Bob, welcome to Mesa.')
    await seeMessage(bob, 'Hi Bob, welcome to Mesa.')

    // Typing travels with sync: false, to the others only.
    await bob.type('#text', 'Still there?')
    await alice.waitForFunction(() => document.getElementById('typing').textContent === 'bob is typing…')
    const demo = await screenshot(alice, 'alice')
    if (demoPng) fs.copyFileSync(demo, path.resolve(root, demoPng))
    await screenshot(bob, 'bob')
    await bob.fill('#text', '')

    // Bob leaves; what alice says meanwhile is stored and redelivered when he is back.
    await bob.evaluate(() => window.mesa.disconnect())
    await waitFor('bob offline on alice\'s page', async () => !(await onlineIds(alice)).includes('bob'))
    // The server's sync decision reads presence in Redis: wait until bob left it.
    const port = new URL(redis).port
    await waitFor('bob out of connected_clients', () =>
      execFileSync('redis-cli', ['-p', port, 'SISMEMBER', 'connected_clients', 'bob']).toString().trim() === '0')
    await say(alice, 'Bob, you missed this one.')
    await seeMessage(alice, 'Bob, you missed this one.')
    await bob.reload()
    await login(bob, server.page, 'bob')
    await waitFor('the missed message on bob\'s page', async () =>
      bob.$$eval('#messages li.missed .text', items => items.some(i => i.textContent === 'Bob, you missed this one.')))
    // The history from before bob left came back with the page.
    await seeMessage(bob, 'Hello Alice!')
    await seeMessage(bob, 'Hi Bob, welcome to Mesa.')
    await screenshot(bob, 'bob-missed')
    const typing = await alice.$eval('#typing', e => e.textContent)
    if (typing !== '') throw new Error(`a stale typing indicator on alice's page: ${typing}`)
    await stop(server.proc)
    return { problems: [...alice.problems, ...bob.problems] }
  },

  // Three pages on two replicas: rooms route across replicas and only to members.
  async rooms () {
    const redis = await redisServer()
    const argv = ['--demo', '--listen', '127.0.0.1:0', '--redis', redis, '--reconnect-interval', '500']
    const one = await mesaServe(argv)
    const two = await mesaServe(argv)
    const context = await browser()
    const alice = await newPage(context, 'alice')
    const bob = await newPage(context, 'bob')
    const carol = await newPage(context, 'carol')
    await login(alice, one.page, 'alice')
    await login(bob, two.page, 'bob')
    await login(carol, one.page, 'carol')
    for (const page of [alice, bob, carol]) await recordMessages(page)

    // Carol creates a room of her own by name and leaves #general.
    await carol.fill('#room-name', 'lounge')
    await carol.click('#create')
    await carol.waitForFunction(() => document.getElementById('room-title').textContent === '#lounge')
    await openRoom(carol, 'general')
    await carol.click('#leave')
    await openRoom(carol, 'lounge')
    await waitFor('carol alone online in #lounge', async () => JSON.stringify(await onlineIds(carol)) === '["carol"]')

    // Alice (replica one) and bob (replica two) join #rust.
    await openRoom(alice, 'rust')
    await openRoom(bob, 'rust')
    const both = ids => JSON.stringify(ids) === '["alice","bob"]'
    await waitFor('alice and bob online in #rust on alice\'s page', async () => both(await onlineIds(alice)))
    await waitFor('alice and bob online in #rust on bob\'s page', async () => both(await onlineIds(bob)))

    await say(bob, 'Hello from replica two')
    await seeMessage(alice, 'Hello from replica two')
    const room = await alice.$$eval('#messages li', items => items.filter(i =>
      i.querySelector('.text').textContent === 'Hello from replica two').map(i => i.dataset.room))
    if (JSON.stringify(room) !== '["rust"]') throw new Error(`the message is shown in ${JSON.stringify(room)} on alice's page`)
    const got = (await received(alice)).filter(m => m.t === 'CHAT' && m.d.text === 'Hello from replica two')
    if (got.length !== 1 || got[0].room !== 'rust') throw new Error(`alice's client got ${JSON.stringify(got)}`)

    // Carol's replica delivered anything for #rust to her before alice saw it: a
    // round trip of her own through #lounge comes after it.
    await say(carol, 'marker in the lounge')
    await seeMessage(carol, 'marker in the lounge')
    const leaked = (await received(carol)).filter(m => m.room === 'rust' || (m.d && m.d.room === 'rust'))
    if (leaked.length > 0) throw new Error(`carol, not in #rust, got ${JSON.stringify(leaked)}`)
    if ((await texts(carol)).includes('Hello from replica two')) throw new Error('carol\'s page shows #rust\'s message')
    const mine = (await received(carol)).filter(m => m.t === 'CHAT' && m.d.text === 'marker in the lounge')
    if (mine.length !== 1 || mine[0].room !== 'lounge') throw new Error(`carol's client got ${JSON.stringify(mine)}`)
    // A refused subscribe rejects with the server's code and reason.
    const refusal = await carol.evaluate(() => window.mesa.subscribe('no spaces allowed').then(
      () => null, error => ({ name: error.name, code: error.code, reason: error.reason, room: error.room })))
    if (!refusal || refusal.name !== 'MesaRoomError' || refusal.code !== 'invalid_room' || !refusal.reason || refusal.room !== 'no spaces allowed') {
      throw new Error(`a subscribe to an invalid room ended with ${JSON.stringify(refusal)}`)
    }
    // Alice's page never heard of carol's room.
    if (await alice.$('#room-list li[data-room="lounge"]')) throw new Error('#lounge is listed on alice\'s page')

    await screenshot(alice, 'alice')
    await screenshot(bob, 'bob')
    await screenshot(carol, 'carol')

    // Who is online is the room's presence over both replicas: alice leaves #rust,
    // comes back (asking who is there), and closes her page.
    const bobAlone = ids => JSON.stringify(ids) === '["bob"]'
    await alice.click('#leave')
    await waitFor('alice out of #rust on bob\'s page', async () => bobAlone(await onlineIds(bob)))
    await alice.click('#enter')
    await waitFor('alice back in #rust on bob\'s page', async () => both(await onlineIds(bob)))
    await waitFor('bob in #rust on alice\'s page again', async () => both(await onlineIds(alice)))
    await alice.close()
    await waitFor('alice out of #rust on bob\'s page once her page closed', async () => bobAlone(await onlineIds(bob)))
    const heard = (await received(bob)).filter(m => m.t === 'ONLINE')
    if (heard.length > 0) throw new Error(`the server still sends its own presence: ${JSON.stringify(heard[0])}`)
    // Back in more rooms at once than the server answers presence requests for (4 per
    // connection), bob's page is still told who is in each.
    const many = ['r1', 'r2', 'r3', 'r4']
    await bob.bringToFront() // a page behind another runs its timers slowly
    for (const room of many) {
      await bob.fill('#room-name', room)
      await bob.click('#create')
    }
    await bob.reload()
    await login(bob, two.page, 'bob')
    for (const room of ['general', 'rust', ...many]) {
      await openRoom(bob, room)
      await waitFor(`bob online in #${room} after a reload`, async () => bobAlone(await onlineIds(bob)))
    }
    await stop(one.proc)
    await stop(two.proc)
    return { problems: [...alice.problems, ...bob.problems, ...carol.problems] }
  },

  // The server restarts under a page; the page shows the banner and recovers.
  async reconnect () {
    const port = await freePort()
    const argv = ['--demo', '--listen', `127.0.0.1:${port}`, '--reconnect-interval', '300']
    let server = await mesaServe(argv)
    const context = await browser()
    const page = await newPage(context, 'carol')
    await login(page, server.page, 'carol')
    await say(page, 'before the restart')
    await seeMessage(page, 'before the restart')

    await stop(server.proc)
    await page.waitForFunction(() => {
      const banner = document.getElementById('banner')
      return !banner.classList.contains('hidden') && /Reconnecting at \d/.test(banner.textContent)
    })
    // Nobody is shown online in green while the page reconnects, carol included.
    await page.waitForFunction(() => {
      const online = document.getElementById('online')
      return online.classList.contains('stale') &&
        [...online.children].some(item => item.textContent === 'carol (you, offline)')
    })
    const banner = await page.$eval('#banner', e => e.textContent)
    log('banner:', banner)
    // 1001 from the drain; 1006 when the process exits before the close frame leaves.
    if (!/Connection lost \((1001|1006)/.test(banner)) throw new Error(`the banner gives no close code: ${banner}`)
    // Sent while offline: queued by the client, flushed once authenticated again.
    await say(page, 'sent while offline')
    await screenshot(page, 'banner')

    server = await waitFor('the server to start again on its port', async () => {
      try { return await mesaServe(argv) } catch (error) { log('restart:', error.message); return null }
    })
    await page.waitForFunction(() => document.getElementById('status').textContent === 'online as carol', null, { timeout: 40000 })
    await page.waitForFunction(() => document.getElementById('banner').classList.contains('hidden'))
    await seeMessage(page, 'sent while offline')
    await say(page, 'after the restart')
    await seeMessage(page, 'after the restart')
    await screenshot(page, 'recovered')
    await stop(server.proc)
    return { banner, problems: page.problems }
  },

  // clients/js's presence in the browser, over two replicas: a page of the demo (not
  // logged in) runs clients of its own from the module the demo serves.
  async presence () {
    const redis = await redisServer()
    const argv = ['--demo', '--listen', '127.0.0.1:0', '--redis', redis]
    const one = await mesaServe(argv)
    const two = await mesaServe(argv)
    const context = await browser()
    const page = await newPage(context, 'presence')
    await page.goto(one.page)
    // window.clients[name]: a client authenticated as `id` on `url`, its join and
    // leave events in `heard`.
    await page.evaluate(() => { window.clients = {} })
    const connect = (name, id, url) => page.evaluate(async ({ name, id, url }) => {
      const { MesaClient } = await import('/mesa-client.js')
      const client = new MesaClient(url)
      client.heard = []
      for (const event of ['join', 'leave']) client.on(event, ({ room, id }) => client.heard.push(`${event} ${room} ${id}`))
      client.connect()
      await client.authenticate({ token: id }, { shouldSync: false })
      window.clients[name] = client
    }, { name, id, url })
    // `action(client)` in the page, for the client called `name`; resolves with its result.
    const run = (name, action) => page.evaluate(`(${action})(window.clients[${JSON.stringify(name)}])`)
    const heard = name => run(name, client => client.heard)
    // Presence goes to Redis in batches: wait until bob's presence() says `expected`.
    const membersAre = async expected => {
      const sorted = members => JSON.stringify(Object.entries(members).sort())
      await waitFor(`presence ${JSON.stringify(expected)}`, async () =>
        sorted(await run('bob', client => client.presence('lobby'))) === sorted(expected))
      log('presence', JSON.stringify(expected))
    }
    // What bob heard of the others (his own join may be missed), once it includes `line`.
    const bobHears = line => waitFor(`bob hearing "${line}"`, async () => {
      const told = (await heard('bob')).filter(entry => !entry.endsWith(' bob'))
      return told.includes(line) && told
    })

    await connect('bob', 'bob', two.ws)
    await connect('alice1', 'alice', one.ws)
    await connect('alice2', 'alice', two.ws)
    await connect('carol', 'carol', one.ws)
    // Asked before subscribing: refused with not_subscribed.
    const refusal = await run('bob', client => client.presence('lobby').then(
      () => null, error => ({ name: error.name, code: error.code, room: error.room })))
    if (!refusal || refusal.name !== 'MesaRoomError' || refusal.code !== 'not_subscribed' || refusal.room !== 'lobby') {
      throw new Error(`presence() before subscribing ended with ${JSON.stringify(refusal)}`)
    }
    await run('bob', client => client.subscribe('lobby', { presence: true }))
    await run('carol', client => client.subscribe('lobby'))
    await bobHears('join lobby carol')
    await membersAre({ bob: 1, carol: 1 })

    // Alice's first tab (on the other replica) joins: bob hears it; her second tab
    // (bob's replica) joins too, and the id still joined once.
    await run('alice1', client => client.subscribe('lobby'))
    await bobHears('join lobby alice')
    await run('alice2', client => client.subscribe('lobby'))
    await membersAre({ alice: 2, bob: 1, carol: 1 })
    // One tab gone: alice is still there, once.
    await run('alice1', client => client.disconnect())
    await membersAre({ alice: 1, bob: 1, carol: 1 })
    // The other tab leaves the room, then carol closes: each is told once.
    await run('alice2', client => client.unsubscribe('lobby'))
    await bobHears('leave lobby alice')
    await run('carol', client => client.disconnect())
    const told = ['join lobby carol', 'join lobby alice', 'leave lobby alice', 'leave lobby carol']
    const bobHeard = await bobHears('leave lobby carol')
    if (JSON.stringify(bobHeard) !== JSON.stringify(told)) throw new Error(`bob heard ${JSON.stringify(bobHeard)}, not ${JSON.stringify(told)}`)
    await membersAre({ bob: 1 })
    // Carol and alice subscribed without presence: they were told nothing.
    for (const name of ['alice1', 'alice2', 'carol']) {
      const got = await heard(name)
      if (got.length > 0) throw new Error(`${name}, without presence, heard ${JSON.stringify(got)}`)
    }
    await stop(one.proc)
    await stop(two.proc)
    return { heard: bobHeard, problems: page.problems }
  },

  // clients/js's recovery in the browser: a room's messages and the sends to the
  // page's id, dispatched while its server is dead, reach it once and in order when it
  // comes back to the server that takes the address.
  async recovery () {
    const redis = await redisServer()
    const port = await freePort()
    const argv = [
      '--listen', `127.0.0.1:${port}`, '--auth', 'dev', '--redis', redis, '--rooms', 'authenticated',
      '--recover-rooms', 'chat:*', '--recover-users', '--reconnect-interval', '100'
    ]
    let server = await mesaServe(argv)
    const statics = await serveClient()
    const context = await browser()
    const page = await newPage(context, 'recovery')
    // What the page sends, to see the positions it reports.
    const sent = []
    page.on('websocket', socket => socket.on('framesent', ({ payload }) => {
      try { sent.push(JSON.parse(payload)) } catch (_) { /* not JSON: not ours to check */ }
    }))
    await page.goto(statics.url)
    // window.seen: the client's events in order, as the application gets them.
    await page.evaluate(async url => {
      const { MesaClient } = await import('/mesa-client.js')
      const client = new MesaClient(url)
      window.client = client
      window.seen = []
      for (const event of ['connected', 'message', 'subscribed', 'resumed', 'streamPosition']) {
        client.on(event, detail => window.seen.push({ event, ...detail }))
      }
      client.connect()
      await client.authenticate({ token: 'alice' })
      await client.subscribe('chat:1')
    }, server.ws)
    const seen = () => page.evaluate(() => window.seen)
    const events = (all, event, pick = () => true) => all.filter(e => e.event === event && pick(e))
    const numbers = all => events(all, 'message', m => m.t === 'N').map(m => m.d.n)
    // Room messages are numbered even, sends to alice odd.
    const env = { MESA_REDIS: redis, MESA_RECOVER_ROOMS: 'chat:*' }
    const send = n => mesaDispatch([
      ...(n % 2 === 0 ? ['--room', 'chat:1'] : ['--to', 'alice']),
      '--type', 'N', '--data', JSON.stringify({ n }), '--recover-users'
    ], env)
    // Taking its id's stream from its authentication: where it stands, nothing to recover.
    await waitFor('the user stream\'s first resume', async () => events(await seen(), 'resumed').length === 1)
    for (let n = 0; n < 4; n++) await send(n)
    const live = await waitFor('4 messages', async () => { const all = await seen(); return numbers(all).length === 4 && all })
    if (JSON.stringify(numbers(live)) !== '[0,1,2,3]') throw new Error(`live: ${JSON.stringify(numbers(live))}`)
    const before = await page.evaluate(() => ({ rooms: window.client.positions(), streams: window.client.streamPositions() }))
    log('positions before the cut', JSON.stringify(before))

    server.proc.child.kill('SIGKILL')
    await server.proc.exited
    for (let n = 4; n < 10; n++) await send(n)
    server = await waitFor('another server on the address', async () => {
      try { return await mesaServe(argv) } catch (error) { log('restart:', error.message); return null }
    })
    const back = (all, event, pick) => events(all, event, pick).length === 2
    const after = await waitFor('the page back, with what it missed', async () => {
      const all = await seen()
      return back(all, 'resumed', e => e.stream === 'user') && back(all, 'subscribed', e => e.room === 'chat:1') &&
        numbers(all).length >= 10 && all
    }, 30000).catch(async error => { throw new Error(`${error.message}; the page saw ${JSON.stringify(await seen())}`) })
    const got = numbers(after)
    const room = got.filter(n => n % 2 === 0)
    const id = got.filter(n => n % 2 === 1)
    if (JSON.stringify([room, id]) !== '[[0,2,4,6,8],[1,3,5,7,9]]') throw new Error(`received ${JSON.stringify(got)}`)
    const resumed = events(after, 'resumed', e => e.stream === 'user')
    const subscribed = events(after, 'subscribed', e => e.room === 'chat:1')
    if (resumed[0].recovered !== null || resumed[1].recovered !== true) throw new Error(`resumed: ${JSON.stringify(resumed)}`)
    if (subscribed[0].recovered !== null || subscribed[1].recovered !== true) throw new Error(`subscribed: ${JSON.stringify(subscribed)}`)
    if (events(after, 'connected').length !== 2) throw new Error(`connections: ${JSON.stringify(events(after, 'connected'))}`)
    checkPositions(after, before)
    checkReported(sent, before)
    const positions = await page.evaluate(() => ({ rooms: window.client.positions(), streams: window.client.streamPositions() }))
    log('positions after', JSON.stringify(positions))
    if (positions.rooms[0].position.offset !== 5 || positions.streams.user.offset !== 5) {
      throw new Error(`positions after: ${JSON.stringify(positions)}`)
    }

    // A server without rooms is sent no position, though the client holds some.
    const plain = await mesaServe(['--listen', '127.0.0.1:0', '--auth', 'dev'])
    await page.evaluate(async ({ url, streams }) => {
      const { MesaClient } = await import('/mesa-client.js')
      const client = new MesaClient(url)
      client.resumeStreams(streams)
      client.connect()
      await client.authenticate({ token: 'bob' })
      client.disconnect()
    }, { url: plain.ws, streams: positions.streams })
    const toPlain = await waitFor('the op 2 to the server without rooms', () => {
      const frames = sent.filter(f => f.op === 2 && f.d.token === 'bob')
      return frames.length > 0 && frames
    })
    if (toPlain.length !== 1 || 'mesa' in toPlain[0].d) throw new Error(`op 2 to a server without rooms: ${JSON.stringify(toPlain)}`)
    await screenshot(page, 'page')
    await stop(plain.proc)
    await stop(server.proc)
    return { received: got, recovered: { room: subscribed[1].recovered, user: resumed[1].recovered }, problems: page.problems }
  },

  // The published mesa-js-client 1.4.8, in the browser, against our server.
  async 'js-client' () {
    const server = await mesaServe(['--auth', 'dev', '--listen', '127.0.0.1:0'])
    const umd = require.resolve('mesa-js-client/lib/mesa-js-client.umd.js')
    const page = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>mesa-js-client 1.4.8</title>
<body style="font: 14px monospace"><h3>mesa-js-client 1.4.8 against mesa-rs</h3><pre id="log"></pre>
<script src="/mesa-js-client.umd.js"></script>`
    const statics = http.createServer((request, response) => {
      if (request.url === '/mesa-js-client.umd.js') {
        response.writeHead(200, { 'content-type': 'text/javascript' })
        return fs.createReadStream(umd).pipe(response)
      }
      response.writeHead(request.url === '/' ? 200 : 404, { 'content-type': 'text/html' })
      response.end(request.url === '/' ? page : 'not found')
    })
    await new Promise(resolve => statics.listen(0, '127.0.0.1', resolve))
    cleanup.push(() => statics.close())
    const context = await browser()
    const tab = await newPage(context, 'mesa-js-client')
    await tab.goto(`http://127.0.0.1:${statics.address().port}/`)
    const version = await tab.evaluate(() => typeof window.MesaClient)
    if (version !== 'function') throw new Error(`the UMD build defined no MesaClient global (${version})`)

    const result = await tab.evaluate(async url => {
      const out = document.getElementById('log')
      const note = line => { out.textContent += line + '\n' }
      const connect = name => new Promise((resolve, reject) => {
        const client = new window.MesaClient(url, { autoConnect: false })
        client.received = []
        client.onMessage = message => {
          client.received.push(message)
          note(`${name} <- ${message.type} ${JSON.stringify(message.data)}`)
        }
        client.onError = error => note(`${name} error: ${error && error.message}`)
        client.onConnected = async () => {
          try {
            const user = await client.authenticate({ token: name }, { shouldSync: false })
            note(`${name} authenticated as ${JSON.stringify(user)}`)
            resolve({ client, user })
          } catch (error) { reject(error) }
        }
        client.connect()
      })
      const until = (what, predicate) => new Promise((resolve, reject) => {
        const started = Date.now()
        const timer = setInterval(() => {
          const found = predicate()
          if (found) { clearInterval(timer); resolve(found) } else if (Date.now() - started > 10000) {
            clearInterval(timer); reject(new Error(`no ${what}`))
          }
        }, 20)
      })
      const alice = await connect('alice')
      const bob = await connect('bob')
      alice.client.send(0, { n: 1 }, 'ECHO')
      const echo = await until('ECHO back to alice', () => alice.client.received.find(m => m.type === 'ECHO'))
      bob.client.send(0, { to: ['alice'], text: 'hi from bob' }, 'BROADCAST')
      const broadcast = await until('BROADCAST to alice', () => alice.client.received.find(m => m.type === 'BROADCAST'))
      return { users: [alice.user, bob.user], echo: echo.data, broadcast: broadcast.data }
    }, server.ws)
    log('mesa-js-client:', JSON.stringify(result))
    if (JSON.stringify(result.users) !== JSON.stringify([{ id: 'alice' }, { id: 'bob' }])) {
      throw new Error(`unexpected users ${JSON.stringify(result.users)}`)
    }
    if (result.echo.n !== 1 || result.broadcast.text !== 'hi from bob') throw new Error(`unexpected messages ${JSON.stringify(result)}`)
    await screenshot(tab, 'page')
    await stop(server.proc)
    return { ...result, problems: tab.problems }
  },

  // The demo over https:// and wss://: chromium trusts the server's certificate by
  // the SHA-256 of its public key (base64), the way Chrome pins a test certificate.
  async tls () {
    const cert = option('--tls-cert')
    const key = option('--tls-key')
    if (!cert || !key) throw new Error('the tls scenario needs --tls-cert FILE --tls-key FILE')
    const server = await mesaServe(['--demo', '--listen', '127.0.0.1:0', '--tls-cert', cert, '--tls-key', key])
    if (!server.page.startsWith('https://') || !server.ws.startsWith('wss://')) {
      throw new Error(`not announced over TLS: ${server.page} ${server.ws}`)
    }
    const publicKey = new crypto.X509Certificate(fs.readFileSync(cert)).publicKey
    const spki = crypto.createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('base64')
    const context = await browser([`--ignore-certificate-errors-spki-list=${spki}`])
    const page = await newPage(context, 'dave')
    await login(page, server.page.replace('127.0.0.1', 'localhost'), 'dave')
    await say(page, 'hello over TLS')
    await seeMessage(page, 'hello over TLS')
    const protocol = await page.evaluate(() => location.protocol)
    if (protocol !== 'https:') throw new Error(`the page came over ${protocol}`)
    await screenshot(page, 'page')
    await stop(server.proc)
    return { protocol, spki, problems: page.problems }
  }
}

// ----- recovery -----

// A page of its own and clients/js (as /mesa-client.js) from a static server; the
// page's WebSocket goes to the mesa server, which takes any origin.
async function serveClient () {
  const module = path.join(root, 'clients', 'js', 'index.js')
  const page = `<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,"><title>clients/js recovery</title>
<body style="font: 14px monospace"><h3>clients/js: recovery</h3>`
  const statics = http.createServer((request, response) => {
    if (request.url === '/mesa-client.js') {
      response.writeHead(200, { 'content-type': 'text/javascript' })
      return fs.createReadStream(module).pipe(response)
    }
    response.writeHead(request.url === '/' ? 200 : 404, { 'content-type': 'text/html' })
    response.end(request.url === '/' ? page : 'not found')
  })
  await new Promise(resolve => statics.listen(0, '127.0.0.1', resolve))
  cleanup.push(() => statics.close())
  return { url: `http://127.0.0.1:${statics.address().port}/` }
}

// Every message of a stream (the room's, the id's) came with a position: offsets
// 1, 2... in one epoch, each followed (the id's) by its streamPosition; the positions
// held before the cut are those of the last messages then.
function checkPositions (seen, before) {
  const roomMessages = seen.filter(e => e.event === 'message' && e.room === 'chat:1')
  const offsets = roomMessages.map(m => m.position && m.position.offset)
  if (JSON.stringify(offsets) !== '[1,2,3,4,5]') throw new Error(`room offsets ${JSON.stringify(offsets)}`)
  const userMessages = seen.filter(e => e.event === 'message' && e.room === null)
  if (userMessages.some(m => m.position !== null)) throw new Error('a send to the id carries a position for the application')
  const told = seen.filter(e => e.event === 'streamPosition')
  const afterEach = seen.flatMap((e, i) => e.event === 'streamPosition' ? [seen[i - 1]] : [])
  if (told.some(e => e.stream !== 'user') || JSON.stringify(afterEach) !== JSON.stringify(userMessages)) {
    throw new Error(`streamPosition events ${JSON.stringify(told)} do not follow each send to the id`)
  }
  if (JSON.stringify(told.map(e => e.position.offset)) !== '[1,2,3,4,5]') throw new Error(`user offsets ${JSON.stringify(told)}`)
  const room = before.rooms.find(r => r.room === 'chat:1')
  if (!room || JSON.stringify(room.position) !== JSON.stringify(roomMessages[1].position)) {
    throw new Error(`room position before the cut ${JSON.stringify(before.rooms)}`)
  }
  if (JSON.stringify(before.streams.user) !== JSON.stringify(told[1].position) || before.streams.broadcast !== null) {
    throw new Error(`stream positions before the cut ${JSON.stringify(before.streams)}`)
  }
}

// After the cut the page reported the positions it held: `since` in its subscribe to
// the room and in its op 2's opt-in (none at the first authentication).
function checkReported (sent, before) {
  const auths = sent.filter(f => f.op === 2 && f.d.token === 'alice')
  const subscribes = sent.filter(f => f.t === 'mesa:subscribe' && f.d.room === 'chat:1')
  const room = before.rooms.find(r => r.room === 'chat:1').position
  const expected = [
    [auths.length, 2],
    [auths[0] && auths[0].d.mesa, { caps: ['rooms'] }],
    [auths[1] && auths[1].d.mesa, { caps: ['rooms'], since: { user: before.streams.user } }],
    [subscribes.length, 2],
    [subscribes[0] && subscribes[0].d.since, undefined],
    [subscribes[1] && subscribes[1].d.since, room]
  ]
  for (const [got, want] of expected) {
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      throw new Error(`the page sent ${JSON.stringify(got)}, not ${JSON.stringify(want)}: ${JSON.stringify(sent)}`)
    }
  }
}

async function main () {
  if (!scenarios[scenario]) return finish({ ok: false, error: `unknown scenario ${scenario}; one of ${Object.keys(scenarios).join(', ')}` })
  if (!mesaBin) return finish({ ok: false, error: '--mesa PATH_TO_MESA_BINARY is required' })
  if (!fs.existsSync(chromiumPath)) return finish({ ok: false, error: `no chromium at ${chromiumPath} (apt-get install chromium)` })
  fs.mkdirSync(outDir, { recursive: true })
  for (const file of fs.readdirSync(outDir)) {
    if (file.startsWith(`${scenario}-`) && file.endsWith('.png')) fs.rmSync(path.join(outDir, file))
  }
  log('chromium', execFileSync(chromiumPath, ['--version']).toString().trim())
  const timer = setTimeout(() => {
    process.stdout.write(JSON.stringify({ ok: false, error: `the scenario took longer than ${RUN_TIMEOUT} ms`, screenshots: shots }) + '\n')
    runCleanup().finally(() => process.exit(1))
  }, RUN_TIMEOUT)
  let result
  try {
    const outcome = await scenarios[scenario]()
    const problems = outcome.problems || []
    result = problems.length === 0
      ? { ok: true, scenario, ...outcome, screenshots: shots }
      : { ok: false, scenario, error: `errors in the page: ${problems.join('; ')}`, screenshots: shots }
  } catch (error) {
    result = { ok: false, scenario, error: error.stack || String(error), screenshots: shots }
  }
  clearTimeout(timer)
  await runCleanup()
  return finish(result)
}

async function runCleanup () {
  for (const step of cleanup.reverse()) {
    try { await step() } catch (_) { /* best effort */ }
  }
  cleanup.length = 0
}

main().then(code => process.exit(code), error => {
  process.stdout.write(JSON.stringify({ ok: false, error: String(error) }) + '\n')
  process.exit(1)
})
