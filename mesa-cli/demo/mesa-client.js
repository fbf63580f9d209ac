// mesa-client.js: a small Mesa client for browsers (an ES module, no dependencies,
// no build step). It speaks the protocol of @cryb/mesa 1.5.8 (see PROTOCOL.md) and is
// meant to be read: it is the reference for writing a Mesa client in any language.
//
//   import { MesaClient } from './mesa-client.js'
//   const client = new MesaClient('ws://127.0.0.1:4000/ws')
//   client.on('message', message => console.log(message.t, message.d))
//   client.on('disconnected', ({ code, reason, reconnectAt }) => ...)
//   client.connect()
//   const user = await client.authenticate({ token: 'alice' })
//   client.send('CHAT', { text: 'hi' })   // queued while offline, flushed on return
//
// What a client must do, in the order this file does it:
// 1. Open the WebSocket. The server speaks first: op 10 (hello) carries the
//    heartbeat interval, the reconnect interval and the rules.
// 2. Answer every op 1 (heartbeat) with op 11 (heartbeat ack). A server that says
//    nothing for interval x (maxAttempts + 1) is dead: drop the socket, reconnect.
// 3. Authenticate with op 2 ({...credentials, shouldSync}); op 22 answers once.
//    After every automatic reconnection, authenticate again with the same data.
//    With shouldSync, messages stored while offline arrive next, numbered s = 1, 2...
// 4. Queue sends made while disconnected (bounded) and flush them, in order, once the
//    connection is open and, when credentials were given, authenticated again.
// 5. When the connection is lost, reconnect after a delay with full jitter: attempt n
//    waits a uniform delay in [0, min(cap, base x 2^n)], base being the server's
//    c_reconnect_interval. Upstream clients retry at a fixed interval, so after a
//    server restart they all come back in the same instant.
// 6. A deliberate disconnect() never reconnects.

export const Opcode = Object.freeze({
  DISPATCH: 0,
  HEARTBEAT: 1,
  AUTHENTICATE: 2,
  HELLO: 10,
  HEARTBEAT_ACK: 11,
  AUTHENTICATED: 22
})

const DEFAULTS = Object.freeze({
  reconnect: true, // reconnect automatically after a lost connection
  backoffBase: 1000, // ms, ceiling of the first delay until the hello says otherwise
  backoffCap: 30000, // ms, ceiling of every delay
  heartbeatMaxAttempts: 3, // beats the server may skip before it counts as dead
  maxQueued: 1024, // sends kept while disconnected
  version: null, // sent as CLIENT_VERSION when the server enforces equal versions
  WebSocket: globalThis.WebSocket
})

// Browsers only let a page close with 1000 or 3000-4999: 4000 means "server silent".
const CLOSE_SERVER_SILENT = 4000

export class MesaClient {
  constructor (url, options = {}) {
    this.url = url
    this.options = { ...DEFAULTS, ...options }
    this.state = 'idle' // idle | connecting | open | backoff
    this.hello = null // the op 10 data of the current connection
    this.user = null // op 22's data on the current connection, once authenticated
    this.queue = [] // sends waiting for an (authenticated) connection
    this.credentials = null // op 2 data, resent after every reconnection
    this.attempt = 0 // failed connection attempts in a row
    this.reconnectAt = null // when the next attempt starts (ms since the epoch)
    this.initialConnection = true
    this.socket = null
    this.timers = { liveness: null, reconnect: null }
    this.waiting = [] // authenticate() promises waiting for op 22
    this.listeners = new Map()
  }

  // ----- events -----

  // Listen to 'connecting', 'connected', 'authenticated', 'message', 'disconnected'
  // or 'error'. Returns a function that stops listening.
  on (event, listener) {
    if (!this.listeners.has(event)) this.listeners.set(event, new Set())
    this.listeners.get(event).add(listener)
    return () => this.listeners.get(event).delete(listener)
  }

  emit (event, detail) {
    for (const listener of this.listeners.get(event) || []) {
      try { listener(detail) } catch (error) { console.error(error) }
    }
  }

  // ----- commands -----

  // Connect now (cutting a pending reconnection delay short).
  connect () {
    if (this.state === 'open' || this.state === 'connecting') return
    clearTimeout(this.timers.reconnect)
    this.open(false)
  }

  // Authenticate with `credentials` (an object, e.g. { token }). Resolves with the
  // user object of op 22. Sent now if open, else once connected, and again after
  // every automatic reconnection.
  authenticate (credentials, { shouldSync = true } = {}) {
    this.credentials = { ...credentials, shouldSync }
    return new Promise((resolve, reject) => {
      if (this.state === 'open') {
        this.transmit({ op: Opcode.AUTHENTICATE, d: this.credentials })
        // The server takes a re-authentication silently: no second op 22.
        if (this.user !== null) return resolve(this.user)
      }
      this.waiting.push({ resolve, reject })
    })
  }

  // Send a dispatch of type `t` with data `d`: now if the connection is ready,
  // else queued (at most maxQueued; beyond that this throws).
  send (t, d = {}) {
    const message = { op: Opcode.DISPATCH, t, d }
    if (this.ready()) return this.transmit(message)
    if (this.queue.length >= this.options.maxQueued) {
      throw new Error(`the send queue is full (${this.queue.length} messages)`)
    }
    this.queue.push(message)
  }

  // Close deliberately: no reconnection follows.
  disconnect (code = 1000, reason = '') {
    const wasConnected = this.state === 'open' || this.state === 'connecting'
    this.state = 'idle'
    this.stopTimers()
    this.user = null
    this.reconnectAt = null
    this.initialConnection = true
    if (this.socket) {
      this.detach(this.socket)
      this.socket.close(code, reason)
      this.socket = null
    }
    if (wasConnected) this.emit('disconnected', { code, reason, reconnectAt: null })
  }

  // ----- the connection -----

  // Whether a send can go out now: open, and authenticated when credentials exist.
  ready () {
    return this.state === 'open' && (this.credentials === null || this.user !== null)
  }

  open (automatic) {
    this.state = 'connecting'
    this.reconnectAt = null
    this.emit('connecting', { automatic, attempt: this.attempt })
    let socket
    try {
      socket = new this.options.WebSocket(this.url)
    } catch (error) {
      return this.lost(1006, `cannot connect: ${error.message}`)
    }
    this.socket = socket
    socket.onopen = () => this.opened(automatic)
    socket.onmessage = event => this.frame(event.data)
    // Closing follows every error; the close event says how it ended.
    socket.onerror = () => {}
    socket.onclose = event => this.lost(event.code, event.reason)
  }

  opened (automatic) {
    this.state = 'open'
    this.hello = null
    this.user = null
    this.emit('connected', { initial: this.initialConnection, automatic })
    this.initialConnection = false
    if (this.credentials !== null) {
      this.transmit({ op: Opcode.AUTHENTICATE, d: this.credentials })
    } else {
      this.flush()
    }
  }

  frame (text) {
    this.refreshLiveness()
    let message
    try {
      message = JSON.parse(text)
    } catch (_) {
      return this.emit('error', new Error('the server sent a frame that is not JSON'))
    }
    if (message === null || typeof message !== 'object' || typeof message.op !== 'number') {
      return this.emit('error', new Error('the server sent a frame that is not a Mesa message'))
    }
    switch (message.op) {
      case Opcode.HELLO:
        return this.adoptHello(message.d || {})
      case Opcode.HEARTBEAT:
        return this.transmit({ op: Opcode.HEARTBEAT_ACK, d: {} })
      case Opcode.AUTHENTICATED: {
        this.user = message.d === undefined ? {} : message.d
        this.attempt = 0 // a connection that got this far counts as a success
        for (const { resolve } of this.waiting.splice(0)) resolve(this.user)
        this.emit('authenticated', { user: this.user })
        return this.flush()
      }
      default:
        // An application message; `s` is set on messages stored while offline.
        return this.emit('message', { op: message.op, t: message.t ?? null, d: message.d, s: message.s ?? null })
    }
  }

  adoptHello (hello) {
    this.hello = hello
    this.attempt = 0
    const rules = Array.isArray(hello.rules) ? hello.rules : []
    if (rules.includes('enforce_equal_versions') && this.options.version) {
      this.transmit({ op: Opcode.DISPATCH, t: 'CLIENT_VERSION', d: { v: this.options.version } })
    }
    this.refreshLiveness()
  }

  // Push the dead-server deadline to interval x (maxAttempts + 1) from now.
  refreshLiveness () {
    clearTimeout(this.timers.liveness)
    const interval = this.hello && this.hello.c_heartbeat_interval
    if (!interval || this.state !== 'open') return
    const window = interval * (this.options.heartbeatMaxAttempts + 1)
    this.timers.liveness = setTimeout(() => {
      const socket = this.socket
      this.lost(CLOSE_SERVER_SILENT, 'heartbeat timeout: server silent')
      if (socket) socket.close(CLOSE_SERVER_SILENT, 'heartbeat timeout: server silent')
    }, window)
  }

  flush () {
    while (this.ready() && this.queue.length > 0) this.transmit(this.queue.shift())
  }

  transmit (message) {
    this.socket.send(JSON.stringify(message))
  }

  // The connection ended without disconnect(): wait, then reconnect.
  lost (code, reason) {
    if (this.state !== 'open' && this.state !== 'connecting') return
    if (this.socket) this.detach(this.socket)
    this.socket = null
    this.stopTimers()
    this.user = null
    if (code === 1008) {
      // Authentication refused (or timed out): tell whoever waits for it.
      for (const { reject } of this.waiting.splice(0)) reject(new Error(reason || 'authentication failed'))
    }
    if (!this.options.reconnect) {
      this.state = 'idle'
      return this.emit('disconnected', { code, reason, reconnectAt: null })
    }
    const delay = this.nextDelay()
    this.state = 'backoff'
    this.reconnectAt = Date.now() + delay
    this.timers.reconnect = setTimeout(() => this.open(true), delay)
    this.emit('disconnected', { code, reason, reconnectAt: this.reconnectAt, attempt: this.attempt })
  }

  // Full jitter: uniform in [0, min(cap, base x 2^attempt)].
  nextDelay () {
    const announced = this.hello && this.hello.c_reconnect_interval
    const base = announced || this.options.backoffBase
    const ceiling = Math.min(this.options.backoffCap, base * 2 ** Math.min(this.attempt, 30))
    this.attempt += 1
    return Math.floor(Math.random() * ceiling)
  }

  detach (socket) {
    socket.onopen = socket.onmessage = socket.onerror = socket.onclose = null
  }

  stopTimers () {
    clearTimeout(this.timers.liveness)
    clearTimeout(this.timers.reconnect)
  }
}
