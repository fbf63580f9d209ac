#!/usr/bin/env node
'use strict'
// A real @cryb/mesa 1.5.8 Server with the same relay behaviour as the mesa-rs server:
//   ECHO      -> back to the sending connection, unchanged
//   BROADCAST -> to every connection, or (when d.to is an array of ids) to those ids
//                minus d.except, through server.send(message, recipients, excluding)
// and development authentication: any non-empty string `token` is accepted as the id,
// with the user object {"id": token}.
//
// Usage: node server.js [PORT] [OPTIONS_JSON]
//   PORT          also env PORT; 0 picks a free port (printed in the listening line)
//   OPTIONS_JSON  also env MESA_OPTIONS; passed to new Server(), e.g.
//                 {"heartbeat":{"enabled":true,"interval":500,"maxAttempts":3},
//                  "reconnect":{"enabled":true,"interval":500},
//                  "authentication":{"timeout":10000,"required":false,"sendUserObject":true,
//                                    "disconnectOnFail":true,"storeConnectedUsers":true},
//                  "redis":"redis://127.0.0.1:6379","namespace":"t1","sync":{"enabled":true},
//                  "client":{"enforceEqualVersions":false},"options":{"storeMessages":false}}
//   env HOST      interface to listen on (default: all, like upstream)
//   env MESA_QUIET=1  report only listening, errors, crashes and exit (no line per
//                 connection or message, no raw-socket listener): for benchmarks
//
// stdout: one JSON object per line (see README.md). stdin (read only when it is a pipe
// or socket; EOF then shuts down like SIGTERM):
//   {"cmd":"send","op":0,"t":"X","d":{},"to":["id"],"except":["id"]}  server.send(...)
//   {"cmd":"exit"}                                                     like SIGTERM

const http = require('http')
const { emit, orNull, errorMessage, chdirForGetVersion, readCommands, stdinIsPipe } = require('./common')

const Mesa = require('@cryb/mesa')
const Server = Mesa.default
const { Message } = Mesa

function parseOptions () {
  const raw = process.argv[3] || process.env.MESA_OPTIONS
  if (!raw) return {}
  try {
    const options = JSON.parse(raw)
    if (!options || typeof options !== 'object' || Array.isArray(options))
      throw new Error('not an object')
    return options
  } catch (error) {
    emit({ event: 'error', message: `invalid options JSON: ${errorMessage(error)}` })
    process.exit(2)
  }
}

const portArg = process.argv[2] !== undefined ? process.argv[2] : process.env.PORT
const port = Number(portArg === undefined ? 0 : portArg)
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  emit({ event: 'error', message: `invalid port ${JSON.stringify(portArg)}` })
  process.exit(2)
}
const options = parseOptions()
const quiet = process.env.MESA_QUIET === '1'
// The events of every connection and message; benchmarks turn them off.
const report = quiet ? () => {} : emit

chdirForGetVersion()

let shuttingDown = false
function shutdown (signal) {
  if (shuttingDown) return
  shuttingDown = true
  emit({ event: 'exit', signal: orNull(signal) })
  process.exit(0)
}

// Upstream's exit handler (the `death` package, SIGINT/SIGTERM/SIGQUIT) first cleans
// its Redis state, then calls beforeExit(signal, exit) if given, else
// process.exit(signal), which throws in Node 20 (a string is not an exit code). Give it
// a beforeExit that exits 0, and a fallback in case that cleanup rejects (it does when
// Redis is on and connections are open but none is authenticated: SREM with no member).
// The fallback also covers a cleanup that never ends (Redis unreachable: ioredis
// queues the commands).
let signalled = null
for (const signal of ['SIGTERM', 'SIGINT', 'SIGQUIT'])
  process.on(signal, () => {
    if (signalled) return
    signalled = signal
    setTimeout(() => shutdown(signal), 3000)
  })
process.on('unhandledRejection', reason => {
  if (signalled) {
    // upstream's exit cleanup failed (upstream itself would crash here)
    emit({ event: 'error', message: `exit cleanup failed: ${errorMessage(reason)}` })
    return shutdown(signalled)
  }
  emit({ event: 'crash', message: `unhandled rejection: ${errorMessage(reason)}` })
  process.exit(1)
})

// An uncaught exception (e.g. a non-JSON frame: upstream's Client#registerMessage does
// JSON.parse unguarded) kills upstream's server; report it, then die the same way.
process.on('uncaughtException', error => {
  emit({ event: 'crash', message: errorMessage(error), stack: orNull(error && error.stack) })
  process.exit(1)
})

// Our own HTTP server (so that port 0 works: upstream turns port 0 into 4000), which
// answers plain HTTP requests with 426 like the one ws creates for the `port` option.
const httpServer = http.createServer((req, res) => {
  const body = http.STATUS_CODES[426]
  res.writeHead(426, { 'Content-Length': body.length, 'Content-Type': 'text/plain' })
  res.end(body)
})

const config = Object.assign({}, options, {
  server: httpServer,
  beforeExit: (signal) => shutdown(signal)
})
delete config.port

const server = new Server(config)

server.on('error', (error, client) => {
  if (error && error.syscall === 'listen') return // reported by httpServer's handler
  emit({
    event: 'error',
    message: errorMessage(error),
    serverId: client ? orNull(client.serverId) : null
  })
})

function stringIds (value) {
  if (!Array.isArray(value)) return null
  return value.filter(id => typeof id === 'string')
}

function devAuthenticate (data) {
  const token = data && data.token
  if (typeof token === 'string' && token.length > 0)
    return { id: token, user: { id: token } }
  return null
}

server.on('connection', client => {
  const serverId = client.serverId
  report({ event: 'connection', serverId })

  client.on('error', error => {
    emit({ event: 'error', serverId, id: orNull(client.id), message: errorMessage(error) })
  })

  client.authenticate((data, done) => {
    const wasAuthenticated = client.authenticated
    const result = devAuthenticate(data)
    try {
      if (result) done(null, result)
      else done(new Error('a non-empty string `token` is required'))
    } catch (error) {
      // Upstream throws here when disconnectOnFail is false and authentication failed
      // (it destructures the missing result); catching it keeps the server alive.
      emit({ event: 'error', serverId, message: `authenticate callback threw: ${errorMessage(error)}` })
    }
    if (result)
      report({ event: 'authenticated', serverId, id: result.id, user: result.user, first: !wasAuthenticated })
    else
      report({ event: 'authentication_failed', serverId, data: orNull(data) })
  })

  client.on('message', message => {
    if (!quiet) emit({
      event: 'message',
      serverId,
      id: orNull(client.id),
      op: orNull(message.opcode),
      t: orNull(message.type),
      d: orNull(message.data)
    })
    if (message.opcode !== 0) return
    const d = message.data
    if (message.type === 'ECHO') {
      client.send(new Message(0, d, 'ECHO'), true)
    } else if (message.type === 'BROADCAST') {
      const to = stringIds(d && d.to)
      const broadcast = new Message(0, d, 'BROADCAST')
      const sent = to
        ? server.send(broadcast, to, stringIds(d.except) || [])
        : server.send(broadcast)
      sent.catch(error => emit({ event: 'error', serverId, message: `send failed: ${errorMessage(error)}` }))
    }
  })

  // A second listener on the raw socket, only to report heartbeat ACKs (upstream
  // consumes op 11 without emitting anything).
  if (!quiet) client.socket.on('message', data => {
    let json
    try {
      json = JSON.parse(data.toString())
    } catch (_) {
      return
    }
    if (json && json.op === 11) report({ event: 'heartbeat_ack', serverId, id: orNull(client.id) })
  })

  client.on('disconnect', (code, reason) => {
    report({ event: 'disconnection', serverId, id: orNull(client.id), code: orNull(code), reason: orNull(reason) })
  })
})

httpServer.on('error', error => {
  emit({ event: 'error', message: errorMessage(error), code: orNull(error.code) })
  if (!httpServer.listening) process.exit(2)
})

httpServer.listen(port, process.env.HOST || undefined, () => {
  emit({ event: 'listening', port: httpServer.address().port })
})

if (stdinIsPipe())
  readCommands(command => {
    switch (command.cmd) {
      case 'send': {
        const message = new Message(command.op === undefined ? 0 : command.op, command.d === undefined ? {} : command.d, command.t)
        const to = stringIds(command.to)
        server.send(message, to || undefined, to ? (stringIds(command.except) || []) : undefined)
          .catch(error => emit({ event: 'error', cmd: 'send', message: errorMessage(error) }))
        break
      }
      case 'exit':
        process.kill(process.pid, 'SIGTERM')
        break
      default:
        emit({ event: 'error', cmd: command.cmd, message: `unknown command ${JSON.stringify(command.cmd)}` })
    }
  }, () => process.kill(process.pid, 'SIGTERM'))
