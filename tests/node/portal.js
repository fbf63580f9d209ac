#!/usr/bin/env node
'use strict'
// Drives the Portal of @cryb/mesa 1.5.8: joins the cluster's portal pool and reports
// the client events the servers address to it (or all of them).
//
// Usage: node portal.js REDIS_URL [CONFIG_JSON]
//   REDIS_URL    also env MESA_REDIS, e.g. redis://127.0.0.1:6379/
//   CONFIG_JSON  also env MESA_OPTIONS; passed to new Portal(redis, config), e.g.
//                {"namespace":"t1","reportAllEvents":true}
//
// stdin: {"cmd":"exit"} (EOF too) sends SIGTERM to itself, so that upstream's own exit
// handler (the `death` package) leaves the pool: PUBLISH {"id","ready":false} and
// SREM, not awaited, then process.exit(0).
// stdout, one JSON event per line:
//   {"event":"ready","id":s}    subscribed to ns("portal") and registered in the pool
//   {"event":"portal","type":"connection"|"authentication"|"disconnection","clientId":s|null}
//   {"event":"portal","type":"message","clientId":s|null,"message":{"op","d","t","s"}}
//                               what the Portal emitted (its events, as upstream gives them)
//   {"event":"raw","data":{...}} every JSON payload on ns("portal"), addressed to this
//                               portal or not (to check the wire format)
//   {"event":"exit"}            upstream's exit handler ran
//   {"event":"error","message":s}, {"event":"crash","message":s,"stack":s}

const { emit, orNull, errorMessage, readCommands, reportCrashes } = require('./common')

const url = process.argv[2] || process.env.MESA_REDIS
if (!url) {
  emit({ event: 'error', message: 'usage: node portal.js redis://host:port [CONFIG_JSON]' })
  process.exit(2)
}
let config = {}
const rawConfig = process.argv[3] || process.env.MESA_OPTIONS
if (rawConfig) {
  try {
    config = JSON.parse(rawConfig)
  } catch (error) {
    emit({ event: 'error', message: `invalid config JSON: ${errorMessage(error)}` })
    process.exit(2)
  }
}

reportCrashes()
process.on('exit', () => emit({ event: 'exit' }))

const { Portal } = require('@cryb/mesa')

const portal = new Portal(url, config)
for (const connection of [portal.redis, portal.publisher, portal.subscriber])
  connection.on('error', error => emit({ event: 'error', message: `redis: ${errorMessage(error)}` }))
portal.on('error', error => emit({ event: 'error', message: errorMessage(error) }))

for (const type of ['connection', 'authentication', 'disconnection'])
  portal.on(type, clientId => emit({ event: 'portal', type, clientId: orNull(clientId) }))
portal.on('message', (message, clientId) => emit({
  event: 'portal',
  type: 'message',
  clientId: orNull(clientId),
  message: { op: orNull(message.opcode), d: orNull(message.data), t: orNull(message.type), s: orNull(message.sequence) }
}))
portal.subscriber.on('message', (_, data) => {
  try {
    emit({ event: 'raw', data: JSON.parse(data) })
  } catch (_) { /* the portal reports it */ }
})

// Upstream subscribes and registers without waiting: wait for both (subscribing again
// to the same channel is harmless), so that events published after `ready` arrive.
const ns = prefix => config.namespace ? `${prefix}_${config.namespace}` : prefix
Promise.all([
  portal.subscriber.subscribe(ns('portal')),
  portal.redis.sismember(ns('available_portals_pool'), portal.id),
  portal.publisher.ping()
])
  .then(([, member]) => {
    if (!member) emit({ event: 'error', message: 'the portal is not in the pool' })
    emit({ event: 'ready', id: portal.id })
  })
  .catch(error => emit({ event: 'error', message: `ready: ${errorMessage(error)}` }))

readCommands(command => {
  switch (command.cmd) {
    case 'exit':
      process.kill(process.pid, 'SIGTERM')
      break
    default:
      emit({ event: 'error', cmd: command.cmd, message: `unknown command ${JSON.stringify(command.cmd)}` })
  }
}, () => process.kill(process.pid, 'SIGTERM'))
