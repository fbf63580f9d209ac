// @mesa-rs/client: a small Mesa client for browsers (an ES module, no dependencies, no
// build step). It speaks the protocol of @cryb/mesa 1.5.8 and the rooms extension of
// mesa-rs (docs/protocol.md), and is meant to be read: it is the reference for writing
// a Mesa client in any language. README.md shows its use; index.d.ts types it.
//
// What a client must do, in the order this file does it:
// 1. Open the WebSocket. The server speaks first: op 10 (hello) carries the
//    heartbeat interval, the reconnect interval and the rules. Nothing is sent
//    before it, since the rules decide what op 2 carries.
// 2. Answer every op 1 (heartbeat) with op 11 (heartbeat ack). A server that says
//    nothing for interval x (maxAttempts + 1) is dead: drop the socket, reconnect.
// 3. Authenticate with op 2 ({...credentials, shouldSync}); op 22 answers once.
//    When the hello has the rule `rooms`, op 2 also opts in to rooms
//    (`mesa: {caps: ['rooms']}`); without credentials, on a server that does not
//    authenticate (no c_authentication_timeout in the hello), op 2 carries the
//    opt-in alone once the application subscribes. After every automatic reconnection,
//    authenticate again with the same data. With shouldSync, messages stored while
//    offline arrive next, numbered s = 1, 2...
// 4. Once ready (open, and authenticated when credentials were given), subscribe
//    again to every room subscribed to, then flush the sends queued while
//    disconnected (bounded), in order.
// 5. Rooms are control dispatches (op 0, `t` starting with `mesa:`) with a `ref`
//    that the answer echoes: `mesa:subscribed`, `mesa:unsubscribed`, `mesa:presence`
//    or `mesa:error`. A subscription made with `presence: true` also hears
//    `mesa:join` and `mesa:leave` (no ref): an id's first connection in the room,
//    its last one gone.
//    A room message is an op 0 with a top-level `room`.
// 6. Recovery: in a recoverable room a message carries its position (top-level
//    `epoch` and `offset`), and `mesa:subscribed` the position the room goes on
//    from. Keep the last one of each room, and send it as `since` when the room is
//    subscribed to again after a reconnection: the server replays what was missed,
//    then answers `recovered`. A send to the client's id or a broadcast taken from
//    its stream carries `stream` ('user' or 'broadcast') and a position too: it is
//    an ordinary message for the application, but its position is kept per stream
//    and reported inside the opt-in of every op 2 (`mesa.since`); `mesa:resumed`
//    answers with where each stream stands and `recovered`.
// 7. When the connection is lost, reconnect after a delay with full jitter: attempt n
//    waits a uniform delay in [0, min(cap, base x 2^n)], base being the server's
//    c_reconnect_interval. Upstream clients retry at a fixed interval, so after a
//    server restart they all come back in the same instant.
// 8. A deliberate disconnect() never reconnects.

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
  rooms: true, // opt in to rooms when the server offers them
  version: null, // sent as CLIENT_VERSION when the server enforces equal versions
  WebSocket: globalThis.WebSocket
})

// Browsers only let a page close with 1000 or 3000-4999: 4000 means "server silent".
const CLOSE_SERVER_SILENT = 4000
// The prefix of control dispatches, reserved by the rooms extension.
const CONTROL = 'mesa:'
// The streams of a client of its own: the sends to its id, and the broadcasts.
const STREAMS = Object.freeze(['user', 'broadcast'])
// The longest epoch a server gives (mesa-core's MAX_EPOCH_BYTES, in characters here).
const MAX_EPOCH = 64

// A position `{epoch, offset}` read from `value` (a frame, a `d`, a saved `since`),
// or null when it has another shape: what is kept must be what the server can read
// back.
function positionOf (value) {
  if (value === null || typeof value !== 'object') return null
  const { epoch, offset } = value
  if (typeof epoch !== 'string' || epoch.length === 0 || epoch.length > MAX_EPOCH) return null
  if (!Number.isSafeInteger(offset) || offset < 0) return null
  return { epoch, offset }
}

// A position handed out (null stays null): the application may keep or change it
// without moving the client's own.
function copy (position) {
  return position === null ? null : { ...position }
}

// A room request the server refused (`mesa:error`), or one that could not be made.
export class MesaRoomError extends Error {
  constructor (room, code, reason) {
    super(`room ${room}: ${code}${reason ? `: ${reason}` : ''}`)
    this.name = 'MesaRoomError'
    this.room = room
    this.code = code
    this.reason = reason
  }
}

export class MesaClient {
  constructor (url, options = {}) {
    this.url = url
    this.options = { ...DEFAULTS, ...options }
    this.state = 'idle' // idle | connecting | open | backoff
    this.hello = null // the op 10 data of the current connection
    this.user = null // op 22's data on the current connection, once authenticated
    this.extended = false // whether this connection opted in to rooms
    this.queue = [] // sends waiting for an (authenticated) connection
    this.credentials = null // op 2 data, resent after every reconnection
    this.subscriptions = new Map() // room -> { token, presence, position, ref, subscribed, waiters }
    this.streams = { user: null, broadcast: null } // the last position in each stream
    this.requests = new Map() // ref -> { kind, room, resolve, reject } awaiting an answer
    this.nextRef = 1
    this.attempt = 0 // failed connection attempts in a row
    this.reconnectAt = null // when the next attempt starts (ms since the epoch)
    this.initialConnection = true
    this.socket = null
    this.timers = { liveness: null, reconnect: null }
    this.waiting = [] // authenticate() promises waiting for op 22
    this.listeners = new Map()
  }

  // ----- events -----

  // Listen to 'connecting', 'connected', 'authenticated', 'message', 'subscribed',
  // 'unsubscribed', 'join', 'leave', 'resumed', 'streamPosition', 'disconnected' or
  // 'error'. Returns a function that stops listening.
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
  // user object of op 22. Sent now if the hello is in, else once it is, and again
  // after every automatic reconnection.
  authenticate (credentials, { shouldSync = true } = {}) {
    this.credentials = { ...credentials, shouldSync }
    return new Promise((resolve, reject) => {
      if (this.state === 'open' && this.hello !== null) {
        this.sendCredentials()
        // The server takes a re-authentication silently: no second op 22.
        if (this.user !== null) return resolve(this.user)
      }
      this.waiting.push({ resolve, reject })
    })
  }

  // Send a dispatch of type `t` with data `d`: now if the connection is ready,
  // else queued (at most maxQueued; beyond that this throws).
  send (t, d = {}) {
    this.sendOrQueue({ op: Opcode.DISPATCH, t, d })
  }

  // Subscribe to `room` (with the server's authorization `token`, if any). Resolves
  // on `mesa:subscribed`, rejects with a MesaRoomError on `mesa:error` or when the
  // server has no rooms. Made now if ready, else once ready; restored after every
  // reconnection until unsubscribe(). With `presence: true`, 'join' and 'leave'
  // events tell who comes and goes (per id, over the cluster). With `since` (a
  // position saved from positions()), a recoverable room replays what came after it.
  subscribe (room, { token, presence = false, since } = {}) {
    const position = since == null ? null : positionOf(since)
    if (since != null && position === null) {
      return Promise.reject(new TypeError('since must be {epoch, offset}, as positions() gives it'))
    }
    let entry = this.subscriptions.get(room)
    if (entry === undefined) {
      // `since` counts for a new subscription only: a held one knows a later position.
      entry = { token, presence, position, ref: null, subscribed: false, waiters: [] }
      this.subscriptions.set(room, entry)
      this.requestSubscription(room)
    }
    if (entry.subscribed) return Promise.resolve()
    return new Promise((resolve, reject) => entry.waiters.push({ resolve, reject }))
  }

  // Leave `room`: resolves on `mesa:unsubscribed` (at once when the subscription was
  // not made yet), rejects with a MesaRoomError on `mesa:error`.
  unsubscribe (room) {
    const entry = this.subscriptions.get(room)
    if (entry === undefined) return Promise.reject(new MesaRoomError(room, 'not_subscribed', 'not subscribed here'))
    this.subscriptions.delete(room)
    this.settle(entry, new MesaRoomError(room, 'unsubscribed', 'unsubscribed before the answer'))
    if (entry.ref === null || !this.roomsReady()) return Promise.resolve()
    return this.request('mesa:unsubscribe', { room })
  }

  // Who is in `room` (a room this connection is in): resolves with an object of each
  // id and its connections there, rejects with a MesaRoomError (`not_subscribed`,
  // `unavailable`, `too_many_requests`, or `disconnected` when the connection ends
  // first). Asked of the connection of the moment only: never queued.
  presence (room) {
    if (!this.roomsReady()) {
      return Promise.reject(new MesaRoomError(room, 'disconnected', 'no connection carries rooms now'))
    }
    return this.request('mesa:presence', { room })
  }

  // Publish a message of type `t` with data `d` to `room` (when the server allows
  // it). Sent now if ready, else queued like send(). A refusal is an 'error' event
  // carrying a MesaRoomError.
  publish (room, t, d = {}) {
    this.sendOrQueue({ op: Opcode.DISPATCH, t: `${CONTROL}publish`, d: { room, t, d, ref: this.nextRef++ } })
  }

  // The rooms subscribed to (made, or waiting to be made).
  rooms () {
    return [...this.subscriptions.keys()]
  }

  // Each room subscribed to, oldest first, with the position of the last message
  // received there (null outside recoverable rooms, or before any): what a page
  // saves to subscribe with `since` after a reload.
  positions () {
    return [...this.subscriptions].map(([room, entry]) => ({ room, position: copy(entry.position) }))
  }

  // The last positions received in the personal and broadcast streams (null when
  // none): reported at every authentication, and what a page saves across reloads.
  streamPositions () {
    return { user: copy(this.streams.user), broadcast: copy(this.streams.broadcast) }
  }

  // Report `since` ({user, broadcast}, saved from streamPositions()) at the next
  // authentication, so the server replays what was missed: call it before
  // authenticate(). A malformed or missing position is none.
  resumeStreams (since = {}) {
    const given = since === null || typeof since !== 'object' ? {} : since
    for (const stream of STREAMS) this.streams[stream] = positionOf(given[stream])
  }

  // Close deliberately: no reconnection follows.
  disconnect (code = 1000, reason = '') {
    const wasConnected = this.state === 'open' || this.state === 'connecting'
    this.state = 'idle'
    this.stopTimers()
    this.reset()
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

  // Whether a send can go out now: hello received, and authenticated when
  // credentials exist.
  ready () {
    return this.state === 'open' && this.hello !== null && (this.credentials === null || this.user !== null)
  }

  // Whether room requests can go out now: ready, and opted in.
  roomsReady () {
    return this.ready() && this.extended
  }

  // Whether the current connection's server offers rooms (and they are wanted).
  offersRooms () {
    const rules = this.hello && Array.isArray(this.hello.rules) ? this.hello.rules : []
    return this.options.rooms && rules.includes('rooms')
  }

  // Whether the server authenticates (its hello announces an authentication timeout).
  authenticates () {
    return this.hello !== null && this.hello.c_authentication_timeout !== undefined
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
    this.reset()
    this.emit('connected', { initial: this.initialConnection, automatic })
    this.initialConnection = false
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
        return this.becameReady()
      }
      default:
        if (this.extended && typeof message.t === 'string' && message.t.startsWith(CONTROL)) {
          return this.control(message.t, message.d || {})
        }
        return this.deliver(message)
    }
  }

  // An application message; `s` is set on messages stored while offline, `room` on
  // a room's messages, `position` on a recoverable room's. Only a connection that
  // opted in is sent positions: on any other, the fields are the application's.
  deliver (message) {
    const room = message.room ?? null
    const position = this.extended ? positionOf(message) : null
    const stream = this.extended && room === null && STREAMS.includes(message.stream) ? message.stream : null
    if (room !== null && position !== null) this.keepPosition(room, position)
    // A stream's message reaches the application as any other: its position is
    // kept, and told after it (once handled, it is what a page saves).
    if (stream !== null && position !== null) this.streams[stream] = position
    this.emit('message', {
      op: message.op,
      t: message.t ?? null,
      d: message.d,
      s: message.s ?? null,
      room,
      position: room === null ? null : copy(position)
    })
    if (stream !== null && position !== null) this.emit('streamPosition', { stream, position: copy(position) })
  }

  // The last position of a room held: the next subscribe resumes after it.
  keepPosition (room, position) {
    const entry = this.subscriptions.get(room)
    if (entry !== undefined) entry.position = position
  }

  adoptHello (hello) {
    this.hello = hello
    this.attempt = 0
    const rules = Array.isArray(hello.rules) ? hello.rules : []
    if (rules.includes('enforce_equal_versions') && this.options.version) {
      this.transmit({ op: Opcode.DISPATCH, t: 'CLIENT_VERSION', d: { v: this.options.version } })
    }
    this.refreshLiveness()
    if (this.credentials !== null) return this.sendCredentials()
    if (this.subscriptions.size > 0) this.optIn()
    this.becameReady()
  }

  // op 2 with the credentials, and the rooms opt-in when the server offers rooms.
  sendCredentials () {
    const d = { ...this.credentials }
    if (this.offersRooms()) {
      d.mesa = this.optInData()
      this.extended = true
    }
    this.transmit({ op: Opcode.AUTHENTICATE, d })
  }

  // The opt-in, with the last positions of the streams when some are known, so the
  // server replays what the client missed there; a server without rooms never sees it.
  optInData () {
    const mesa = { caps: ['rooms'] }
    const since = {}
    for (const stream of STREAMS) if (this.streams[stream] !== null) since[stream] = copy(this.streams[stream])
    if (Object.keys(since).length > 0) mesa.since = since
    return mesa
  }

  // op 2 with the opt-in alone, for a connection without credentials on a server
  // that does not authenticate: on one that does, op 2 is an authentication
  // attempt, and rooms wait for `authenticate`.
  optIn () {
    if (this.extended || !this.offersRooms() || this.authenticates()) return
    this.transmit({ op: Opcode.AUTHENTICATE, d: { mesa: this.optInData() } })
    this.extended = true
  }

  // The connection can carry sends: restore the subscriptions, then flush the queue.
  becameReady () {
    if (!this.ready()) return
    for (const room of this.subscriptions.keys()) this.requestSubscription(room)
    while (this.ready() && this.queue.length > 0) this.transmit(this.queue.shift())
  }

  // Send `mesa:subscribe` for `room` if the connection can; refuse it at once when
  // the server has no rooms.
  requestSubscription (room) {
    if (!this.ready()) return
    const entry = this.subscriptions.get(room)
    if (this.credentials === null) this.optIn()
    if (!this.extended) {
      this.subscriptions.delete(room)
      const error = this.offersRooms()
        ? new MesaRoomError(room, 'unauthorized', 'authenticate first: the server authenticates')
        : new MesaRoomError(room, 'unsupported', 'the server offers no rooms')
      return this.settle(entry, error)
    }
    entry.ref = this.nextRef++
    const d = { room, ref: entry.ref }
    if (entry.token !== undefined) d.token = entry.token
    if (entry.presence) d.presence = true
    if (entry.position !== null) d.since = copy(entry.position)
    this.requests.set(entry.ref, { kind: 'subscribe', room })
    this.transmit({ op: Opcode.DISPATCH, t: `${CONTROL}subscribe`, d })
  }

  // Send a control request whose answer settles the returned promise.
  request (kind, d) {
    const ref = this.nextRef++
    return new Promise((resolve, reject) => {
      this.requests.set(ref, { kind, room: d.room, resolve, reject })
      this.transmit({ op: Opcode.DISPATCH, t: kind, d: { ...d, ref } })
    })
  }

  // A control dispatch: the answer to a request (by its ref), or the server's own
  // join or removal (ref null).
  control (t, d) {
    if (t === `${CONTROL}resumed`) return this.resumed(d)
    const request = d.ref === null || d.ref === undefined ? undefined : this.requests.get(d.ref)
    if (request !== undefined) this.requests.delete(d.ref)
    const room = d.room
    if (t === `${CONTROL}subscribed`) {
      const entry = this.subscriptions.get(room)
      if (entry !== undefined && entry.ref === d.ref) {
        entry.subscribed = true
        this.settle(entry, null)
      }
      // In a recoverable room: where its messages go on from (the replay is in), and
      // whether the replay was complete (false: reload the room's state).
      const position = positionOf(d)
      if (position !== null) this.keepPosition(room, position)
      return this.emit('subscribed', {
        room,
        byServer: request === undefined,
        position: copy(position),
        recovered: typeof d.recovered === 'boolean' ? d.recovered : null
      })
    }
    if (t === `${CONTROL}join` || t === `${CONTROL}leave`) {
      return this.emit(t.slice(CONTROL.length), { room, id: d.id })
    }
    if (t === `${CONTROL}presence`) {
      if (request !== undefined && request.resolve) request.resolve(d.members)
      return
    }
    if (t === `${CONTROL}unsubscribed`) {
      if (request === undefined) this.subscriptions.delete(room)
      else if (request.resolve) request.resolve()
      return this.emit('unsubscribed', { room, byServer: request === undefined })
    }
    if (t === `${CONTROL}error`) {
      const error = new MesaRoomError(room, d.code, d.reason)
      if (request !== undefined && request.kind === 'subscribe') {
        const entry = this.subscriptions.get(room)
        if (entry !== undefined && entry.ref === d.ref) {
          this.subscriptions.delete(room)
          return this.settle(entry, error)
        }
      }
      if (request !== undefined && request.reject) return request.reject(error)
      return this.emit('error', error)
    }
  }

  // Where a personal or the broadcast stream stands after an authentication (what
  // was missed since the position reported is in), or, unasked, that the server
  // could not forward what a live connection missed (recovered false).
  resumed (d) {
    if (!STREAMS.includes(d.stream)) return
    const position = positionOf(d)
    if (position !== null) this.streams[d.stream] = position
    this.emit('resumed', {
      stream: d.stream,
      position: copy(position),
      recovered: typeof d.recovered === 'boolean' ? d.recovered : null
    })
  }

  // Resolve (error null) or reject every promise waiting on a subscription.
  settle (entry, error) {
    for (const { resolve, reject } of entry.waiters.splice(0)) {
      if (error === null) resolve()
      else reject(error)
    }
  }

  sendOrQueue (message) {
    if (this.ready()) return this.transmit(message)
    if (this.queue.length >= this.options.maxQueued) {
      throw new Error(`the send queue is full (${this.queue.length} messages)`)
    }
    this.queue.push(message)
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

  transmit (message) {
    this.socket.send(JSON.stringify(message))
  }

  // Forget what belonged to the connection: its user, opt-in and the requests it was
  // to answer. Subscriptions stay, to be made again on the next one; the hello stays
  // until the next one, for its reconnect interval.
  reset () {
    this.user = null
    this.extended = false
    for (const entry of this.subscriptions.values()) {
      entry.ref = null
      entry.subscribed = false
    }
    const lost = new MesaRoomError('', 'disconnected', 'the connection closed before the answer')
    for (const request of this.requests.values()) if (request.reject) request.reject(lost)
    this.requests.clear()
  }

  // The connection ended without disconnect(): wait, then reconnect.
  lost (code, reason) {
    if (this.state !== 'open' && this.state !== 'connecting') return
    if (this.socket) this.detach(this.socket)
    this.socket = null
    this.stopTimers()
    this.reset()
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
